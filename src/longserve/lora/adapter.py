"""One LoRA adapter read from a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``).

An adapter is, per projection it targets, a pair A [rank, in] and B [out, rank] with the update
``W + scale * B @ A``; scale is ``lora_alpha / rank`` (``lora_alpha / sqrt(rank)`` with rsLoRA). What PEFT can
save but longserve does not run (DoRA, trained biases, whole modules saved beside the adapter, per-module rank
or alpha patterns) is refused with a ``LoRAError`` that says which.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILE = "adapter_model.safetensors"
# PEFT saves a causal LM's tensors as base_model.model.<the base model's own name>.lora_{A,B}.weight.
PEFT_PREFIX = "base_model.model."


class LoRAError(ValueError):
    """An adapter that cannot be served (missing files, unsupported options, shapes that do not fit)."""


@dataclass(frozen=True)
class LoRAAdapter:
    name: str
    path: str
    rank: int  # the largest rank of its modules
    # the base model's weight name ("model.layers.0.self_attn.q_proj.weight") -> (A [r, in], B [out, r] * scale)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    base_model: str | None = None  # base_model_name_or_path, as PEFT recorded it

    @property
    def num_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())


def read_adapter(name: str, path: str | Path, max_rank: int) -> LoRAAdapter:
    """The adapter in directory ``path``, with B already scaled; ``LoRAError`` if it cannot be served or
    its rank exceeds ``max_rank``."""
    directory = Path(path)
    if not directory.is_dir():
        raise LoRAError(f"LoRA adapter {name!r}: {path} is not a directory")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise LoRAError(f"LoRA adapter {name!r}: {config_path} is missing")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LoRAError(f"LoRA adapter {name!r}: {config_path} is not valid JSON: {exc}") from None
    _check_config(name, config)
    tensors = _read_tensors(name, directory)
    alpha = float(config.get("lora_alpha", 8))
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise LoRAError(f"LoRA adapter {name!r}: tensor {key} is not a LoRA A or B matrix")
            continue
        module = key[: -len(".lora_A.weight")]
        b_key = module + ".lora_B.weight"
        if b_key not in tensors:
            raise LoRAError(f"LoRA adapter {name!r}: {key} has no {b_key}")
        a, b = tensors[key].float(), tensors[b_key].float()
        rank = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != rank:
            raise LoRAError(
                f"LoRA adapter {name!r}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                "not [rank, in] and [out, rank]"
            )
        if rank > max_rank:
            raise LoRAError(
                f"LoRA adapter {name!r}: rank {rank} of {module} exceeds max_lora_rank ({max_rank})"
            )
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        base_name = module.removeprefix(PEFT_PREFIX) + ".weight"
        modules[base_name] = (a.contiguous(), (b * scale).contiguous())
    if len(modules) * 2 != len(tensors):
        orphans = sorted(
            k for k in tensors if k.endswith(".lora_B.weight") and k.replace("_B.", "_A.") not in tensors
        )
        raise LoRAError(f"LoRA adapter {name!r}: B matrices without A: {orphans[:3]}")
    if not modules:
        raise LoRAError(f"LoRA adapter {name!r}: no LoRA tensors in {directory}")
    rank = max(a.shape[0] for a, _ in modules.values())
    return LoRAAdapter(name, str(directory), rank, modules, config.get("base_model_name_or_path"))


def _check_config(name: str, config: dict) -> None:
    def refuse(what: str) -> LoRAError:
        return LoRAError(f"LoRA adapter {name!r}: {what} is not supported")

    if config.get("peft_type", "LORA") != "LORA":
        raise refuse(f"peft_type {config.get('peft_type')!r} (only LORA)")
    if config.get("use_dora"):
        raise refuse("DoRA (use_dora)")
    if config.get("bias", "none") != "none":
        raise refuse(f"training biases (bias={config.get('bias')!r})")
    if config.get("modules_to_save"):
        raise refuse(f"modules saved whole beside the adapter ({config['modules_to_save']})")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise refuse("per-module rank_pattern / alpha_pattern")
    for option in ("lora_bias", "trainable_token_indices", "target_parameters", "layer_replication",
                   "use_qalora", "use_bdlora"):  # fmt: skip
        if config.get(option):
            raise refuse(f"{option}")
    if config.get("fan_in_fan_out"):
        raise refuse("fan_in_fan_out (Conv1D bases)")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise LoRAError(f"LoRA adapter {name!r}: lora_alpha must be a positive number, got {alpha!r}")


def _read_tensors(name: str, directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / WEIGHT_FILE
    if not path.is_file():
        hint = (
            " (adapter_model.bin: save it with safe_serialization=True)"
            if (directory / "adapter_model.bin").is_file()
            else ""
        )
        raise LoRAError(f"LoRA adapter {name!r}: {path} is missing{hint}")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise LoRAError(f"LoRA adapter {name!r}: cannot read {path.name}: {exc}") from None
