"""Tool-call parsers on real model-format strings: whole-output parsing, and streaming checked against it for
every way of splitting the text (hypothesis split points and 1-char pieces): same content, same calls, ids
and names in each call's first delta, argument fragments that concatenate to parse()'s arguments, and no
streamed content that the final content does not start with (so no partial marker ever leaks)."""

import json
import re
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longserve.serve.tool_parsers import (
    ToolParser,
    detect_tool_parser,
    get_tool_parser,
    make_tool_call_id,
    tool_parser_names,
)

TOOLS = {"get_weather", "get_time", "search"}
DS_BEGIN, DS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
PARIS = '{"city": "Paris"}'


def ds_v3(name: str, args: str) -> str:
    return f"{DS_CALL}function{DS_SEP}{name}\n```json\n{args}\n```{DS_CALL_END}"


@dataclass
class Case:
    parser: str
    text: str
    content: str | None
    calls: list[tuple[str, str]]  # (name, arguments exactly as parse() must return them)
    tools: set[str] | None = None

    def __repr__(self) -> str:  # readable parametrize ids
        return f"{self.parser}:{self.text[:40]!r}"


def hermes(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


# Every case here is well-formed or broken before any call is named, so a stream must agree with parse().
CASES = [
    Case("hermes", hermes("get_weather", PARIS), None, [("get_weather", PARIS)]),
    Case(
        "hermes",
        hermes("get_weather", PARIS) + "\n" + hermes("get_time", '{"tz":"Europe/Paris"}'),
        None,
        [("get_weather", PARIS), ("get_time", '{"tz": "Europe/Paris"}')],
    ),
    Case("hermes", "I'll check.\n\n" + hermes("get_weather", PARIS), "I'll check.", [("get_weather", PARIS)]),
    Case(
        "hermes",
        "<think>\nThe user wants the weather; <tool_call> fits.\n</think>\n\n" + hermes("search", '{"q": 1}'),
        "<think>\nThe user wants the weather; <tool_call> fits.\n</think>",
        [("search", '{"q": 1}')],
    ),
    Case(
        "hermes",
        "<think>\nWeather needed.\n</think>\n\n" + hermes("get_weather", PARIS) + "\nDone.",
        "<think>\nWeather needed.\n</think>\n\n\nDone.",
        [("get_weather", PARIS)],
    ),
    Case("hermes", "  Plain text, a < b, <b>bold</b>, <tool_calls> and <tool_c  ", None, []),
    Case(
        "hermes",
        hermes("search", '{"q": "Z\\u00fcrich \\ud83c\\udf27 東京", "n": [1, -2.5e-3, true, null], "o": {}}'),
        None,
        [("search", '{"q": "Zürich 🌧 東京", "n": [1, -2.5e-3, true, null], "o": {}}')],
    ),
    Case("hermes", '<tool_call>\n{"name": get_weather}\n</tool_call>', None, []),
    Case(
        "hermes",
        "<tool_call>not json</tool_call> then " + hermes("get_time", "{}"),
        "<tool_call>not json</tool_call> then",
        [("get_time", "{}")],
    ),
    Case("hermes", hermes("launch", "{}"), None, [], TOOLS),
    Case("hermes", hermes("get_time", '"{\\"tz\\": \\"UTC\\"}"'), None, [("get_time", '{"tz": "UTC"}')]),
    Case("hermes", '<tool_call>{"name": "get_time"}', None, [("get_time", "{}")]),
    Case("hermes", hermes("search", '{"code": "a\n\tb"}'), None, [("search", '{"code": "a\\n\\tb"}')]),
    Case(
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        [("get_weather", PARIS)],
    ),
    Case(
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "arguments": ' + PARIS + "}",
        None,
        [("get_weather", PARIS)],
    ),
    Case(
        "llama3_json",
        '\n{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}};',
        None,
        [("get_weather", PARIS), ("get_time", "{}")],
    ),
    Case(
        "llama3_json",
        'Let me look.<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "Let me look.",
        [("get_weather", PARIS)],
    ),
    # Longer than what a streamed region keeps of its read text; the spaces end inside a pending ";" lookahead.
    Case(
        "llama3_json",
        '{"name": "search", "parameters": {"q": "' + "ab" * 3000 + '"}}' + " " * 5000 + "Done.",
        "Done.",
        [("search", '{"q": "' + "ab" * 3000 + '"}')],
    ),
    Case(
        "hermes",
        "Writing.\n" + hermes("search", '{"q": "' + "é\\n" * 3000 + '"}'),
        "Writing.",
        [("search", '{"q": "' + "é\\n" * 3000 + '"}')],
    ),
    Case("llama3_json", "Paris is the capital of France.", None, []),
    Case("llama3_json", '{"answer": 42}', None, []),
    Case("llama3_json", '{"name": "Alice", "age": 30}', None, []),
    Case("llama3_json", 'Like this: {"name": "get_time", "parameters": {}}', None, []),
    Case("llama3_json", '<|python_tag|>brave_search.call(query="weather")', None, []),
    Case(
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Zürich"}}',
        None,
        [("get_weather", '{"city": "Zürich"}')],
    ),
    Case("llama3_json", '{"name": "rm", "parameters": {}}', None, [], TOOLS),
    Case(
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        None,
        [("get_weather", PARIS)],
    ),
    Case(
        "mistral",
        'Checking.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}, '
        '{"name": "get_time", "arguments": {"tz": "CET"}, "id": "f5g6h7i8j"}]',
        "Checking.",
        [("get_weather", PARIS), ("get_time", '{"tz": "CET"}')],
    ),
    Case("mistral", "[TOOL_CALLS]get_weather[ARGS]" + PARIS, None, [("get_weather", PARIS)]),
    Case(
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city":"Paris"}[TOOL_CALLS]get_time[CALL_ID]x1y2z3w4v[ARGS]{"tz":"東京"}',
        None,
        [("get_weather", PARIS), ("get_time", '{"tz": "東京"}')],
    ),
    Case("mistral", "No tools needed [TOOL_CA here, [TOOL_CALLS] no.", None, []),
    Case("mistral", "[TOOL_CALLS][oops]", None, []),
    Case(
        "mistral",
        '[TOOL_CALLS][{"name": "nuke", "arguments": {}}, {"name": "get_time", "arguments": {}}]',
        None,
        [],
        TOOLS,
    ),
    Case(
        "mistral",
        '[TOOL_CALLS][{"name": "get_time", "arguments": {}}, {"name": "nuke", "arguments": {}}]',
        None,
        [("get_time", "{}")],
        TOOLS,
    ),
    Case("deepseek_v3", DS_BEGIN + ds_v3("get_weather", PARIS) + DS_END, None, [("get_weather", PARIS)]),
    Case(
        "deepseek_v3",
        "<think>\nTwo things.\n</think>\n\n"
        + DS_BEGIN
        + ds_v3("get_weather", '{"city": "Paris"}')
        + "\n"
        + ds_v3("get_time", '{"tz": "Asia/Tokyo", "fmt": "时间"}')
        + DS_END,
        "<think>\nTwo things.\n</think>",
        [("get_weather", PARIS), ("get_time", '{"tz": "Asia/Tokyo", "fmt": "时间"}')],
    ),
    Case(
        "deepseek_v3",
        DS_BEGIN + f"{DS_CALL}get_weather{DS_SEP}{PARIS}{DS_CALL_END}" + DS_END,
        None,
        [("get_weather", PARIS)],
    ),
    Case("deepseek_v3", "Sure: " + DS_BEGIN + ds_v3("get_time", "{}"), "Sure:", [("get_time", "{}")]),
    Case("deepseek_v3", "The weather is fine. <｜tool▁ is a token.", None, []),
    Case("deepseek_v3", DS_BEGIN + DS_CALL + "oops", None, []),
    Case("deepseek_v3", DS_BEGIN + ds_v3("nuke", "{}") + DS_END, None, [], TOOLS),
]
for _case in CASES:  # content None means "the text is content": spelt once here rather than in every case
    if _case.content is None and not _case.calls:
        _case.content = _case.text.strip()


def parser_for(case: Case) -> ToolParser:
    return get_tool_parser(case.parser)(case.tools)


def run_stream(parser: ToolParser, pieces: list[str], final_content: str | None = None, **kw):
    """Stream ``pieces``; reassemble independently of the parser, checking the delta protocol on the way."""
    stream = parser.stream(**kw)
    content, calls = "", []
    for i, piece in enumerate([*pieces, None]):
        delta = stream.feed(piece) if piece is not None else stream.finish()
        content += delta.content or ""
        if final_content is not None and i < len(pieces):
            assert (final_content or "").startswith(content), (content, final_content)
        for d in delta.tool_calls:
            if d.id is not None:  # a call's first delta: id and name, indices in order
                assert d.index == len(calls) and d.name
                calls.append({"id": d.id, "name": d.name, "arguments": d.arguments})
            else:
                assert d.name is None and d.index < len(calls)
                calls[d.index]["arguments"] += d.arguments
    return content, calls


def check_stream(case: Case, pieces: list[str]) -> None:
    assert "".join(pieces) == case.text
    parser = parser_for(case)
    parsed = parser.parse(case.text)
    content, calls = run_stream(parser, pieces, parsed.content)
    assert content == (parsed.content or "")
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.name, c.arguments) for c in parsed.tool_calls]
    ids = [c["id"] for c in calls]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_parse(case):
    parsed = parser_for(case).parse(case.text)
    assert parsed.content == case.content
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == case.calls
    for call in parsed.tool_calls:
        assert isinstance(json.loads(call.arguments), dict)
        assert re.fullmatch(r"call_[0-9a-f]{24}", call.id)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_stream_in_one_char_pieces_and_whole(case):
    check_stream(case, list(case.text))
    check_stream(case, [case.text])


def random_splits(text: str):
    return st.lists(st.integers(1, max(len(text) - 1, 1)), max_size=12).map(
        lambda cuts: [
            text[a:b] for a, b in zip([0, *sorted(set(cuts))], [*sorted(set(cuts)), len(text)], strict=True)
        ]
    )


@pytest.mark.parametrize("case", CASES, ids=repr)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_stream_in_random_pieces(case, data):
    check_stream(case, data.draw(random_splits(case.text)))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    args=st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    layout=st.sampled_from([{}, {"indent": 2}, {"separators": (",", ":")}, {"ensure_ascii": False}]),
    parser_name=st.sampled_from(["hermes", "mistral", "deepseek_v3"]),
    data=st.data(),
)
def test_arguments_are_json_dumps_of_any_object_however_written_and_split(args, layout, parser_name, data):
    raw = json.dumps(args, **layout)
    text = {
        "hermes": hermes("f", raw),
        "mistral": f"[TOOL_CALLS]f[ARGS]{raw}",
        "deepseek_v3": DS_BEGIN + ds_v3("f", raw) + DS_END,
    }[parser_name]
    case = Case(parser_name, text, None, [("f", json.dumps(args, ensure_ascii=False))])
    parsed = parser_for(case).parse(text)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == case.calls and parsed.content is None
    check_stream(case, data.draw(random_splits(text)))


SOUP = ["<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", DS_BEGIN, DS_CALL, DS_SEP]
SOUP += [DS_CALL_END, DS_END, "function", "\n```json\n", "```", '{"name": ', '"get_time"', '"arguments": ']
SOUP += ["{", "}", "[", "]", ",", ";", ":", '"x"', "1", "tru", "e", " ", "\n", "text", "<", "\\u00e9", '"']


@settings(max_examples=300, deadline=None)
@given(
    parser_name=st.sampled_from(sorted(tool_parser_names())),
    tokens=st.lists(st.sampled_from(SOUP), max_size=30),
    data=st.data(),
)
def test_arbitrary_text_never_raises_and_deferred_streaming_matches_parse(parser_name, tokens, data):
    text = "".join(tokens)
    parser = get_tool_parser(parser_name)()
    parsed = parser.parse(text)
    for call in parsed.tool_calls:
        assert isinstance(json.loads(call.arguments), dict)
    pieces = data.draw(random_splits(text)) if text else []
    content, calls = run_stream(parser, pieces, parsed.content, defer_calls=True)
    assert content == (parsed.content or "")
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.name, c.arguments) for c in parsed.tool_calls]
    # Streaming calls early may stop at a region that breaks after its call was sent, never earlier.
    content, _ = run_stream(parser, pieces, parsed.content)
    assert (parsed.content or "").startswith(content)


def test_arguments_stream_before_the_call_is_complete():
    stream = get_tool_parser("deepseek_v3")().stream()
    first = stream.feed("Hi" + DS_BEGIN + DS_CALL + "function" + DS_SEP + "get_weather\n")
    assert first.content == "Hi" and [(d.index, d.name, d.arguments) for d in first.tool_calls] == [
        (0, "get_weather", "")
    ]
    assert first.tool_calls[0].id is not None
    more = stream.feed('```json\n{"city": "Pa')
    assert [(d.index, d.id, d.arguments) for d in more.tool_calls] == [(0, None, '{"city": "Pa')]
    assert [d.arguments for d in stream.feed('ris", "days": 1').tool_calls] == ['ris", "days": ']
    assert [d.arguments for d in stream.feed("0}\n```" + DS_CALL_END + DS_END).tool_calls] == ["10}"]
    assert stream.finish().tool_calls == []


def test_text_that_may_start_a_marker_is_held_until_ruled_out_or_finished():
    stream = get_tool_parser("hermes")().stream()
    assert stream.feed("Sure <tool_c").content == "Sure"
    assert stream.feed("ould> help").content == " <tool_could> help"
    assert stream.feed(" <tool").content is None
    assert stream.finish().content == " <tool"
    stream = get_tool_parser("mistral")().stream()
    assert stream.feed("ok [TOOL").content == "ok"
    delta = stream.feed('_CALLS]get_time[ARGS]{"tz": "UTC"}')
    assert delta.content is None and delta.tool_calls[0].name == "get_time"


@pytest.mark.parametrize(
    "parser_name, text, before, name, partial",
    [
        (
            "hermes",
            'Let me see. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
            "Let me see.",
            "get_weather",
            '{"city": "Par',
        ),
        (
            "hermes",
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>',
            "",
            "get_weather",
            PARIS,
        ),
        ("llama3_json", '{"name": "get_time", "parameters": {"tz": 12', "", "get_time", '{"tz": '),
        ("mistral", '[TOOL_CALLS][{"name": "search", "arguments": {"q": }}]', "", "search", '{"q": '),
        (
            "deepseek_v3",
            "x" + DS_BEGIN + DS_CALL + "function" + DS_SEP + "get_time\n```json\n{",
            "x",
            "get_time",
            "{",
        ),
    ],
)
def test_malformed_after_the_name_is_content_for_parse_and_a_cut_call_for_a_stream(
    parser_name, text, before, name, partial
):
    parser = get_tool_parser(parser_name)()
    assert parser.parse(text).content == text.strip() and parser.parse(text).tool_calls == []
    content, calls = run_stream(parser, list(text))
    assert content == before and [(c["name"], c["arguments"]) for c in calls] == [(name, partial)]
    assert run_stream(parser, list(text), defer_calls=True) == (text.strip(), [])


def test_unknown_tools_only_with_a_tool_list():
    text = hermes("launch", "{}")
    assert get_tool_parser("hermes")(None).parse(text).tool_calls[0].name == "launch"
    assert get_tool_parser("hermes")(["get_time"]).parse(text).content == text


def test_make_tool_call_id_is_random_and_openai_shaped():
    ids = {make_tool_call_id() for _ in range(100)}
    assert len(ids) == 100 and all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)


def test_registry():
    assert tool_parser_names() == ["deepseek_v3", "hermes", "llama3_json", "mistral"]
    for name in tool_parser_names():
        assert get_tool_parser(name).name == name
    needs = {n: get_tool_parser(n).needs_special_tokens for n in tool_parser_names()}
    assert needs == {"deepseek_v3": True, "hermes": False, "llama3_json": True, "mistral": True}
    with pytest.raises(
        ValueError, match="unknown tool parser 'qwen'.*deepseek_v3, hermes, llama3_json, mistral"
    ):
        get_tool_parser("qwen")


QWEN25 = (
    '{%- if tools %}{{- "<|im_start|>system\\n# Tools\\n\\n<tools>" }}{%- for tool in tools %}{{- tool | tojson }}'
    '{%- endfor %}{{- "</tools>\\n\\nFor each function call, return a json object with function name and arguments'
    ' within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}'
)
MISTRAL = "{%- if message.tool_calls %}{{- '[TOOL_CALLS][' }}{%- for tool_call in message.tool_calls %}"
DEEPSEEK = (
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'}}"
)
LLAMA31 = (
    '{{- "Respond in the format {\\"name\\": function name, \\"parameters\\": dictionary of argument name and its'
    ' value}." }}{{- "<|eot_id|>" }}{%- if builtin_tools is defined %}{{- "<|python_tag|>" + tool_call.name }}'
)
LLAMA32 = (
    '{{- \'{"name": function name, "parameters": dictionary of argument name and its value}\' }}<|eot_id|>'
)
LLAMA2 = (
    "{% for message in messages %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}{% endfor %}"
)


@pytest.mark.parametrize(
    "template, architecture, expected",
    [
        (QWEN25, "Qwen2ForCausalLM", "hermes"),
        (QWEN25, "LlamaForCausalLM", "hermes"),  # Hermes-3-Llama-3.1: the template's syntax wins
        (MISTRAL, None, "mistral"),
        (DEEPSEEK, None, "deepseek_v3"),
        (LLAMA31, None, "llama3_json"),
        (LLAMA32, "LlamaForCausalLM", "llama3_json"),
        (LLAMA2, None, None),
        ("<|eot_id|>", None, None),
        (None, "Qwen3MoeForCausalLM", "hermes"),
        (None, "MistralForCausalLM", "mistral"),
        (None, "MixtralForCausalLM", "mistral"),
        (None, "DeepseekV3ForCausalLM", "deepseek_v3"),
        (None, "DeepseekV2ForCausalLM", None),
        (LLAMA2, "LlamaForCausalLM", "llama3_json"),
        (None, "GPT2LMHeadModel", None),
        (None, None, None),
    ],
)
def test_detect_tool_parser(template, architecture, expected):
    assert detect_tool_parser(template, architecture) == expected
