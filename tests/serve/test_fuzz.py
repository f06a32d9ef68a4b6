"""Property-based fuzzing of the API server (hypothesis) against the real stack: whatever the body, the answer is
never a 5xx, an error always has OpenAI's shape, and a stream always ends with [DONE] and no error event.

The default run tries a few dozen bodies per endpoint; ``-m slow`` tries a thousand.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import wait_until
from stack import MODEL, Stack, all_blocks_free

SURROGATES = st.sampled_from(["\udfff", "a\ud800b", "\udbff\udfff\udc00"])
TEXT = st.one_of(st.text(max_size=40), SURROGATES)
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
    st.lists(st.integers(min_value=-3, max_value=10**6), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


# Per field: values the field accepts (mostly) and the nasty ones; a body takes valid values for all its fields
# but up to two, so that bodies reach the engine as often as they stop at validation.
def _num(low: float, high: float) -> tuple:
    valid = st.one_of(st.floats(min_value=low, max_value=high), st.sampled_from([low, high, 1e-40, 5e-324]))
    nasty = st.one_of(st.sampled_from([-1e-300, 1e300, low - 1, high + 1]), JUNK)
    return valid, nasty


def _int(low: int, high: int) -> tuple:
    nasty = st.one_of(st.sampled_from([low - 1, 2**63, -(2**63) - 1]), JUNK)
    return st.integers(min_value=low, max_value=high), nasty


def _choice(valid, nasty=JUNK) -> tuple:
    return valid, nasty


GOOD_TEXT = st.text(max_size=40)
TOKEN_IDS = st.lists(st.integers(min_value=0, max_value=255), min_size=1, max_size=12)
BAD_TOKEN_IDS = st.one_of(st.lists(st.integers(min_value=-2, max_value=10**6), max_size=12), JUNK)
SAMPLING = {
    "temperature": _num(0, 2),
    "top_p": _num(1e-6, 1),
    "top_k": _int(-1, 60),
    "min_p": _num(0, 1),
    "presence_penalty": _num(-2, 2),
    "frequency_penalty": _num(-2, 2),
    "repetition_penalty": _num(0.01, 100),
    "seed": _int(-(2**63), 2**63 - 1),
    "stop": _choice(
        st.one_of(st.text(min_size=1, max_size=6), st.lists(st.text(min_size=1, max_size=6), max_size=3))
    ),
    "stop_token_ids": _choice(st.lists(st.integers(min_value=0, max_value=300), max_size=3), BAD_TOKEN_IDS),
    "n": _int(1, 3),
    "min_tokens": _int(0, 4),
    "ignore_eos": _choice(st.booleans()),
    "stream": _choice(st.booleans()),
    "stream_options": _choice(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "logit_bias": _choice(st.none()),
    "user": _choice(GOOD_TEXT, st.one_of(SURROGATES, JUNK)),
    "unknown_field": _choice(JUNK, SURROGATES),
}
PROMPT = st.one_of(st.text(min_size=1, max_size=40), TOKEN_IDS, st.lists(TOKEN_IDS, min_size=1, max_size=3))
CONTENT = st.one_of(
    GOOD_TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": GOOD_TEXT}), max_size=2)
)
NASTY_CONTENT = st.one_of(
    SURROGATES,
    st.lists(st.fixed_dictionaries({"type": st.sampled_from(["image_url", "x"]), "text": TEXT}), max_size=2),
    JUNK,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]), "content": CONTENT}
)
NASTY_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "tool", "robot", ""]), "content": st.one_of(CONTENT, NASTY_CONTENT)}
)
COMPLETION = {
    **SAMPLING,
    "prompt": _choice(PROMPT, st.one_of(SURROGATES, BAD_TOKEN_IDS, st.lists(TEXT, max_size=3), JUNK)),
    "max_tokens": _int(0, 24),
    "echo": _choice(st.booleans()),
    "logprobs": _int(0, 20),
    "best_of": _int(1, 3),
    "suffix": _choice(st.just(""), st.one_of(TEXT, JUNK)),
}
CHAT = {
    **SAMPLING,
    "messages": _choice(
        st.lists(MESSAGE, min_size=1, max_size=3), st.one_of(st.lists(NASTY_MESSAGE, max_size=3), JUNK)
    ),
    "max_tokens": _int(1, 24),
    "max_completion_tokens": _int(1, 24),
    "logprobs": _choice(st.booleans()),
    "top_logprobs": _int(0, 20),
    "tools": _choice(st.none()),
    "response_format": _choice(
        st.fixed_dictionaries({"type": st.just("text")}), st.one_of(st.just({"type": "json_object"}), JUNK)
    ),
}
EMBEDDING = {
    "input": _choice(PROMPT, st.one_of(SURROGATES, BAD_TOKEN_IDS, JUNK)),
    "encoding_format": _choice(st.sampled_from(["float", "base64"]), st.one_of(st.just("hex"), JUNK)),
    "dimensions": _choice(st.none()),
    "model": _choice(st.just(MODEL), st.one_of(TEXT, JUNK)),
}
ENDPOINTS = {"/v1/completions": COMPLETION, "/v1/chat/completions": CHAT, "/v1/embeddings": EMBEDDING}
REQUIRED = {"/v1/completions": ["prompt"], "/v1/chat/completions": ["messages"], "/v1/embeddings": ["input"]}


@st.composite
def requests(draw) -> tuple[str, dict]:
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    fields = ENDPOINTS[path]
    optional = sorted(set(fields) - set(REQUIRED[path]))
    names = REQUIRED[path] + draw(st.lists(st.sampled_from(optional), unique=True, max_size=6))
    nasty = draw(st.lists(st.sampled_from(names), unique=True, max_size=2))
    body = {"model": MODEL}
    body.update({name: draw(fields[name][name in nasty]) for name in names})
    return path, body


@pytest.fixture(scope="module")
def fuzz_stack(tiny_llama_dir):
    with Stack(tiny_llama_dir, 1) as stack:
        yield stack


def _check(stack: Stack, path: str, body: dict) -> None:
    raw = json.dumps(body)  # NaN and Infinity go out as the bare literals some clients send
    response = httpx.post(
        f"{stack.api_url}{path}", content=raw, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code < 500, (body, response.status_code, response.text)
    if response.status_code != 200:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]
        assert '"error"' not in response.text, (body, response.text)
    else:
        assert "error" not in response.json(), response.text


FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LONG = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(request=requests())
def test_fuzzed_requests_never_get_a_5xx(fuzz_stack, request):
    _check(fuzz_stack, *request)


@pytest.mark.slow
@LONG
@given(request=requests())
def test_fuzzed_requests_never_get_a_5xx_long_run(fuzz_stack, request):
    _check(fuzz_stack, *request)


def test_nothing_is_left_behind_after_fuzzing(fuzz_stack):
    wait_until(lambda: all_blocks_free(fuzz_stack.engines[0]) and fuzz_stack.workers[0].in_flight == 0)
