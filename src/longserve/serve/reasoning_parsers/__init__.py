"""Reasoning parsers: a reasoning model's output split into its reasoning and its answer, whole
(``ReasoningSplitter.parse``) or streamed (``feed``/``finish``), as vLLM's ``--reasoning-parser`` does.

Every format here marks the reasoning with a pair of tags at the start of the output:

- ``deepseek_r1``: ``<think>…</think>`` (DeepSeek-R1 and its distills; newer templates open ``<think>`` in the
  prompt, so the output begins inside the reasoning);
- ``qwen3``: ``<think>…</think>`` (Qwen3, QwQ; with ``enable_thinking: false`` the template closes an empty
  block in the prompt and the output is all answer);
- ``think``: the same tags for any other model that uses them;
- ``mistral``: ``[THINK]…[/THINK]`` (Magistral).

Whether the output starts inside the reasoning is read from the prompt: it does when the rendered prompt ends
with the opening tag. Otherwise reasoning is only what the output opens with the tag itself.
"""

from __future__ import annotations

from longserve.serve.reasoning_parsers.splitter import ReasoningFormat, ReasoningSplitter

__all__ = ["ReasoningFormat", "ReasoningSplitter", "detect_reasoning_parser", "get_reasoning_parser"]

_FORMATS = {
    "deepseek_r1": ReasoningFormat("deepseek_r1", "<think>", "</think>"),
    "qwen3": ReasoningFormat("qwen3", "<think>", "</think>"),
    "think": ReasoningFormat("think", "<think>", "</think>"),
    "mistral": ReasoningFormat("mistral", "[THINK]", "[/THINK]"),
}


def reasoning_parser_names() -> list[str]:
    return sorted(_FORMATS)


def get_reasoning_parser(name: str) -> ReasoningFormat:
    """The format called ``name``; ValueError naming the known ones otherwise."""
    try:
        return _FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {reasoning_parser_names()}") from None


def detect_reasoning_parser(chat_template: str | None) -> str | None:
    """The format a chat template teaches (its thinking tags), None if it has none."""
    template = chat_template or ""
    if "[THINK]" in template:
        return "mistral"
    if "</think>" not in template:
        return None
    if "<｜Assistant｜>" in template:
        return "deepseek_r1"
    if "<|im_start|>" in template:
        return "qwen3"
    return "think"
