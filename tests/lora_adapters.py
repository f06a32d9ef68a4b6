"""Tiny PEFT LoRA adapters for tests, written by ``peft`` itself on a tiny base checkpoint: A and B random
(``init_lora_weights=False``), so every targeted projection's update is far from zero."""

from __future__ import annotations

import os

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
