"""Tiny PEFT LoRA adapters for tests, written by ``peft`` itself on a tiny base checkpoint: A and B random
(``init_lora_weights=False``), so every targeted projection's update is far from zero."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(
    base_dir: str,
    directory: str | os.PathLike,
    *,
    targets: list[str] | None = None,
    rank: int = 4,
    alpha: float = 8.0,
    rslora: bool = False,
    seed: int = 0,
    **extra,
) -> str:
    """A PEFT adapter for the checkpoint in ``base_dir`` into ``directory``; ``extra``: more LoraConfig
    fields (to write adapters longserve must refuse)."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import load_hf_model

    torch.manual_seed(seed)
    base = load_hf_model(base_dir)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets or ALL_TARGETS, use_rslora=rslora,
        init_lora_weights=False, **extra,
    )  # fmt: skip
    model = get_peft_model(base, config)
    with torch.no_grad():  # PEFT's random init is small: scale B up so the update moves the logits well
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(4.0)
    model.save_pretrained(str(directory), safe_serialization=True)
    return str(directory)


def peft_logits(base_dir: str, adapter_dir: str, prompt: list[int]) -> torch.Tensor:
    """HF transformers + PEFT (the oracle): fp32 logits [len(prompt), vocab] with the adapter applied."""
    from peft import PeftModel
    from tiny_models import load_hf_model

    model = PeftModel.from_pretrained(load_hf_model(base_dir), adapter_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float()


def write_random_adapter(config, directory: Path, rank: int, seed: int) -> str:
    """A PEFT adapter with rank ``rank`` on every projection of a model of ``config`` (DecoderConfig), written
    directly (no ``peft``, any base: GGUF files too); A ~ N(0, 1/in), B ~ N(0, 0.01^2)."""
    from safetensors.torch import save_file

    hidden, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {  # (out, in) of each projection
        "q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
        "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter),
    }  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for name in ALL_TARGETS:
            part = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{name}"
            out_features, in_features = shapes[name]
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(rank, in_features, generator=generator) * in_features**-0.5
            )
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config_json = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ALL_TARGETS,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config_json))
    return str(directory)
