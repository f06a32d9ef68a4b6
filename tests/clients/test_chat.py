"""`longserve chat` driven through a pseudo-terminal: turns that carry the history, /reset, /system, Ctrl-C
while a reply streams (the server aborts it, the REPL goes on), errors as one line, /exit, and a local model."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator

import httpx
import pexpect
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "serve"))
from servers import unused_port, wait_until  # noqa: E402  (tests/serve helpers)
from stack import Stack, all_blocks_free  # noqa: E402

PROMPT = ">>> "
USAGE = re.compile(r"\[(\d+) prompt tokens, (\d+) completion tokens, finish: (\w+)")


@pytest.fixture(scope="module")
def stack(tiny_llama_dir: str) -> Iterator[Stack]:
    with Stack(tiny_llama_dir, num_workers=1, engine_options={"kv_cache_memory_mb": 16}) as running:
        yield running


@pytest.fixture
def recorded_prompts(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The text of every prompt the engine accepts, chat template applied."""
    engine = stack.engines[0].engine
    prompts: list[str] = []
    original = engine.add_request

    def recording(request):
        prompts.append(engine.tokenizer.decode(request.prompt_token_ids, skip_special_tokens=False))
        return original(request)

    monkeypatch.setattr(engine, "add_request", recording)
    return prompts


def spawn(*args: str, timeout: float = 30) -> pexpect.spawn:
    env = os.environ | {"TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    child = pexpect.spawn(
        sys.executable, ["-m", "longserve.cli", "chat", *args], env=env, encoding="utf-8", timeout=timeout
    )
    child.expect_exact(PROMPT)
    return child


def ask(child: pexpect.spawn, text: str) -> tuple[int, int, str]:
    """One turn with --show-usage: (prompt tokens, completion tokens, finish reason)."""
    child.sendline(text)
    child.expect(USAGE)
    prompt, completion, finish = child.match.groups()
    child.expect_exact(PROMPT)
    return int(prompt), int(completion), finish


def leave(child: pexpect.spawn) -> None:
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def requests_running(stack: Stack) -> float:
    body = httpx.get(f"{stack.api_url}/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", body, re.M))


def test_turns_carry_the_history_and_reset_clears_it(stack: Stack, recorded_prompts: list[str]) -> None:
    child = spawn("--base-url", f"{stack.api_url}/v1", "--max-tokens", "6", "--show-usage")
    first = ask(child, "Hello there")
    assert first[1:] == (6, "length")  # the tiny random model never stops on its own
    second = ask(child, "And again")
    assert second[0] > first[0] + 2
    sent = recorded_prompts[-1]
    assert sent.count("<|im_start|>assistant") == 2 and sent.index("Hello there") < sent.index("And again")
    child.sendline("/reset")
    child.expect_exact("(conversation cleared)")
    child.expect_exact(PROMPT)
    assert ask(child, "Hello there")[0] == first[0]
    child.sendline("/system Be brief.")
    child.expect_exact("(system prompt set; new conversation)")
    child.expect_exact(PROMPT)
    assert ask(child, "Hello there")[0] > first[0]
    assert recorded_prompts[-1].startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert recorded_prompts[-1].count("Hello there") == 1
    leave(child)


def test_ctrl_c_stops_the_reply_and_the_repl_goes_on(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, recorded_prompts: list[str]
) -> None:
    engine = stack.engines[0]
    original_step = engine.engine.step

    finishes: list[str] = []

    def slow_step():  # ~500 tokens to the context limit: seconds of streaming to interrupt
        time.sleep(0.02)
        outputs = original_step()
        finishes.extend(o.seqs[0].finish_reason for o in outputs if o.finished and o.seqs)
        return outputs

    monkeypatch.setattr(engine.engine, "step", slow_step)
    child = spawn("--base-url", f"{stack.api_url}/v1", "--show-usage")
    child.sendline("Tell me everything")
    child.expect_exact("Tell me everything\r\n")  # the terminal's echo; the reply follows
    child.expect(r"\S", timeout=10)
    assert requests_running(stack) == 1
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT)
    wait_until(lambda: finishes == ["abort"], timeout=5, what="the server to abort the request")
    wait_until(lambda: requests_running(stack) == 0 and all_blocks_free(engine), what="the engine to idle")
    child.sendline("/set max_tokens 4")
    child.expect_exact("max_tokens 4")
    child.expect_exact(PROMPT)
    assert ask(child, "Short one")[1] == 4
    sent = recorded_prompts[-1]  # the stopped reply stayed in the history, as far as it got
    assert sent.count("<|im_start|>assistant") == 2 and sent.index("everything") < sent.index("Short one")
    child.sendintr()  # at the prompt: a hint, the REPL stays
    child.expect_exact("press Ctrl-C again")
    child.expect_exact(PROMPT)
    leave(child)


def test_errors_print_one_line_and_the_repl_continues(stack: Stack) -> None:
    child = spawn("--base-url", f"{stack.api_url}/v1", "--model", "no-such-model")
    child.sendline("Hi")
    child.expect(r"error: HTTP 404: [^\r\n]*no-such-model")
    child.expect_exact(PROMPT)
    child.sendline("/nope")
    child.expect_exact("unknown command /nope")
    child.expect_exact(PROMPT)
    leave(child)


def test_an_unreachable_server_and_two_ctrl_c_at_the_prompt() -> None:
    down = f"http://127.0.0.1:{unused_port()}/v1"
    child = spawn("--base-url", down, "--model", "m")
    child.sendline("Hi")
    child.expect_exact(f"error: cannot connect to {down} (Connection refused)")
    child.expect_exact(PROMPT)
    child.sendintr()
    child.expect_exact("press Ctrl-C again")
    child.sendintr()  # twice in a row at the prompt leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_local_model(tiny_llama_dir: str) -> None:
    # greedy: the random tiny model sampled at the default temperature sometimes ends early on its EOS token
    child = spawn(
        "--local", tiny_llama_dir, "--kv-cache-memory-mb", "16", "--max-tokens", "5", "--show-usage",
        "--temperature", "0",
    )  # fmt: skip
    prompt_tokens, completion_tokens, finish = ask(child, "Hello there")
    assert completion_tokens == 5 and finish == "length" and prompt_tokens > 3
    leave(child)


def test_a_reasoning_models_thinking_is_marked_and_kept_out_of_the_history() -> None:
    """Against the real API server and worker over a fake engine that says what the prompt scripts."""
    from api_fakes import create_fake_controller, create_fake_worker
    from servers import serve_app

    from longserve.config import ServeConfig
    from longserve.serve.api_server import create_api_app

    worker = create_fake_worker(context_length=512, reasoning_parser="think")
    with serve_app(worker) as worker_url, serve_app(create_fake_controller([worker_url])) as controller_url:
        with serve_app(create_api_app(ServeConfig(controller_address=controller_url))) as api_url:
            child = spawn("--base-url", f"{api_url}/v1", "--show-usage", "--max-tokens", "60")
            child.sendline("SAY:<think>two and two</think>Four.")
            child.expect_exact("[thinking] two and two")
            child.expect_exact("[answer] Four.")
            child.expect(USAGE)
            child.expect_exact(PROMPT)
            child.sendline("SAY:next")
            child.expect(USAGE)
            child.expect_exact(PROMPT)
            leave(child)
    second = worker.state.engine.requests[-1]
    prompt = "".join(map(chr, second.prompt_token_ids))
    assert prompt.endswith("<assistant>Four.<user>SAY:next<assistant>")  # the answer alone went back
