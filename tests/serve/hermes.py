"""A tiny random checkpoint whose chat template is Hermes/Qwen-style, so tools reach the template and the
"hermes" tool parser is detected (the tool-calling end-to-end tests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Enough of Qwen2.5's template: tools in the system turn, assistant tool calls, tool results.
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: <tools>{% for tool in tools %}{{ tool.function.name }} "
    "{% endfor %}</tools> answer with <tool_call><|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{% for call in message.tool_calls %}<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n</tool_call>'
    "{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def hermes_model_dir(tiny_llama_dir: str, directory: Path) -> str:
    """A copy of the tiny Llama checkpoint in ``directory`` with ``HERMES_TEMPLATE`` as its chat template."""
    model_dir = directory / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = HERMES_TEMPLATE
    config_path.write_text(json.dumps(config))
    return str(model_dir)
