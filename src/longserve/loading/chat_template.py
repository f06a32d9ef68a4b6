"""Render a model's chat template (Jinja2, sandboxed) the way Hugging Face transformers does."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Appended to the final message when continuing it, then cut off with everything the template put after it.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class ChatTemplate:
    """One compiled chat template; compile once (on the tokenizer), render many times."""

    def __init__(self, source: str) -> None:
        self.source = source
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from e

    def render(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        special_tokens: Mapping[str, str | None] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for ``messages``.

        ``special_tokens`` (``bos_token``, ``eos_token``, ...) and ``kwargs`` (e.g. ``enable_thinking``) become
        template variables. ``continue_final_message`` leaves the last message open so the model continues it.
        Any error in the template or a ``raise_exception`` call becomes a ``ValueError``.
        """
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be set")
        # The template only ever sees plain JSON-like data: rich objects carry methods the sandbox cannot vet.
        chat = _plain(messages)
        if not isinstance(chat, list) or not all(isinstance(m, dict) for m in chat):
            raise ValueError("messages must be a list of dicts")
        final_content = None
        if continue_final_message:
            if not chat or not isinstance(chat[-1].get("content"), str):
                raise ValueError("continue_final_message needs a final message with string content")
            final_content = chat[-1]["content"]
            chat[-1]["content"] = final_content + _CONTINUE_TAG
        variables = {**_plain(dict(special_tokens or {})), **_plain(kwargs)}
        try:
            text = self._template.render(
                messages=chat,
                tools=_plain(tools),
                documents=_plain(documents),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from e
        except (TypeError, KeyError, IndexError, AttributeError, ValueError) as e:
            raise ValueError(f"chat template failed on these messages: {type(e).__name__}: {e}") from e
        if final_content is not None:
            text = _cut_at_continue_tag(text, final_content)
        return text


def _cut_at_continue_tag(text: str, final_content: str) -> str:
    at = text.rfind(_CONTINUE_TAG.strip())
    if at < 0 or final_content.strip() not in text:
        raise ValueError("continue_final_message: the chat template dropped or altered the final message")
    if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:at]
    # The template stripped the message's trailing whitespace (and so the tag's space): follow it.
    return text[:at].rstrip()


def _plain(value: Any) -> Any:
    """``value`` rebuilt from JSON types; anything else becomes an inert ``<TypeName>`` placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses such as enums carry methods: strip back to the base type
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    numpy = sys.modules.get("numpy")  # a numpy scalar exists only where numpy is loaded: never imported here
    if numpy is not None and isinstance(value, numpy.generic):  # np.bool_(False) must not become truthy
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models (the API's message objects)
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators=None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes '<' and '>', which would change what the model sees.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore names, so templates cannot reach CPython internals through it."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (training-mask markers) and render the body as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    # Settings as transformers uses them, so templates written for HF render identically.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env
