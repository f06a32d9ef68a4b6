"""Chat templates: same text as transformers, HF's template helpers, sandboxing, clear errors."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

import longserve.loading.tokenizer as tokenizer_module
from longserve.loading.chat_template import ChatTemplate

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3? 🤔 请回答"},
    ],
    [{"role": "user", "content": "  spaces and\nnewlines\t "}, {"role": "assistant", "content": ""}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_default_template_matches_transformers(
    default_checkpoint, hf_gguf_tokenizer, messages, add_generation_prompt
):
    ours = default_checkpoint.tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt
    )
    theirs = hf_gguf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    assert ours.startswith("<|im_start|>system\n")
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_template_is_compiled_once_per_tokenizer(default_checkpoint, monkeypatch):
    compiled = []

    class Counting(ChatTemplate):
        def __init__(self, source: str) -> None:
            compiled.append(source)
            super().__init__(source)

    monkeypatch.setattr(tokenizer_module, "ChatTemplate", Counting)
    monkeypatch.setattr(default_checkpoint.tokenizer, "_compiled_template", None)
    for messages in CONVERSATIONS:
        default_checkpoint.tokenizer.apply_chat_template(messages)
    assert compiled == [default_checkpoint.tokenizer.chat_template]


def test_trim_and_lstrip_blocks_like_hf():
    template = ChatTemplate(
        "{% for m in messages %}\n    {% if m.role == 'user' %}\nU: {{ m.content }}\n    {% endif %}\n{% endfor %}\n"
    )
    assert (
        template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
        == "U: a\nU: b\n"
    )


def test_special_tokens_and_kwargs_reach_the_template():
    template = ChatTemplate(
        "{{ bos_token }}{% if enable_thinking %}<think>{% endif %}{{ messages[0].content }}"
    )
    text = template.render(
        [{"role": "user", "content": "q"}], special_tokens={"bos_token": "<s>"}, enable_thinking=True
    )
    assert text == "<s><think>q"


def test_tojson_keeps_html_characters_and_unicode():
    template = ChatTemplate("{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}")
    tools = [{"name": "<b>", "text": "é"}]
    rendered = template.render([], tools=tools, add_generation_prompt=False)
    assert rendered == json.dumps(tools, ensure_ascii=False) + "|" + json.dumps(
        tools[0], indent=2, ensure_ascii=False
    )


def test_strftime_now():
    assert ChatTemplate("{{ strftime_now('%Y') }}").render([]) == str(datetime.now().year)


def test_generation_tag_renders_its_body():
    template = ChatTemplate(
        "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
    )
    assert template.render([{"role": "assistant", "content": "x"}]) == "[x]"


def test_raise_exception_becomes_value_error():
    template = ChatTemplate(
        "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    )
    assert template.render([{"role": "user", "content": ""}]) == "ok"
    with pytest.raises(ValueError, match="first must be user"):
        template.render([{"role": "assistant", "content": ""}])


def test_syntax_error_names_the_line():
    with pytest.raises(ValueError, match="line 2"):
        ChatTemplate("fine\n{% for m in messages %}never closed")


def test_type_error_in_template_becomes_value_error(default_checkpoint):
    with pytest.raises(ValueError, match="chat template"):
        default_checkpoint.tokenizer.apply_chat_template([{"role": "user", "content": None}])


def test_sandbox_blocks_python_internals():
    for source in (
        "{{ messages.__class__.__mro__ }}",
        "{{ ''.__class__.__subclasses__() }}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
        "{{ messages.append(1) }}",  # the environment is immutable
    ):
        with pytest.raises(ValueError, match="unsafe|cannot set namespace attribute"):
            ChatTemplate(source).render([{"role": "user", "content": "x"}])


def test_continue_final_message(default_checkpoint):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}]
    text = default_checkpoint.tokenizer.apply_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    assert text.endswith("<|im_start|>assistant\nHello, I am")


def test_messages_are_not_mutated_and_rich_objects_are_neutralised():
    class Rich:
        def delete_everything(self):  # a template must never be able to call this
            raise AssertionError

    messages = [{"role": "user", "content": "x", "extra": Rich()}]
    assert ChatTemplate("{{ messages[0].extra }}").render(messages) == "<Rich>"
    assert isinstance(messages[0]["extra"], Rich)


def test_tokenizer_without_template(write_gguf):
    from longserve.loading.gguf_loader import load_gguf

    tok = load_gguf(write_gguf({}, arch="qwen2", metadata={"tokenizer.chat_template": None})).tokenizer
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
