"""A decoder layer of a CPU decode step as one compiled call (``csrc/decoder_layer_cpu.cpp``), for layers whose
every projection runs on packed GGUF tiles, with dense attention and a SwiGLU feed-forward (Llama, Mistral,
Qwen2 on ``gguf``/``gguf-q8``). It calls the modules' own kernels in their order, so its output equals theirs
bit for bit; what it saves is the ~100 µs of Python and dispatch a layer costs at a few rows a step.

Steps with prompt chunks (prefill, speculative verification) go through the modules. LoRA slots, once the
engine attaches them, are handed to the compiled layer, which adds each row's update with the modules' own
kernel (``lora_add_``).
"""

from __future__ import annotations

from types import ModuleType

import torch

from longserve.attention.dense import CPU_KERNEL_CACHE_DTYPES, DenseAttention
from longserve.attention.metadata import AttentionMetadata
from longserve.attention.paged_cache import LayerKVCache
from longserve.layers.attention import SelfAttention
from longserve.layers.linear import Linear
from longserve.layers.mlp import SwiGLUMLP


class CpuDecodeLayer:
    """The compiled layer and what decides, each step, whether it may run."""

    def __init__(self, compiled, projections: tuple[Linear, ...]) -> None:
        self.compiled = compiled
        self.projections = projections  # qkv, o, gate_up, down: the compiled layer's order
        self.lora_rows = None  # the adapters' LoRARows once handed over

    def _lora_ready(self) -> bool:
        """No adapter slots, or slots already handed to the compiled layer (they are allocated once and
        never move); False where the slots use the torch path (not fp32 on the CPU)."""
        if self.lora_rows is not None:
            return True
        loras = [linear.lora for linear in self.projections]
        attached = [lora for lora in loras if lora is not None]
        if not attached:
            return True
        rows = attached[0].rows
        if rows.kernels is None:
            return False
        self.compiled.set_lora_rows(rows.row_slots, rows.num_slots, attached[0].max_rank)
        for index, lora in enumerate(loras):
            if lora is not None:
                self.compiled.set_lora(index, lora.a, lora.bt)
        self.lora_rows = rows
        return True

    @classmethod
    def build(cls, layer, kernels: ModuleType) -> CpuDecodeLayer | None:
        """For a ``PreNormDecoderLayer`` the compiled layer computes exactly; None for any other."""
        attn, mlp = layer.self_attn, layer.mlp
        if not (
            isinstance(attn, SelfAttention)
            and attn.q_norm is None
            and type(attn.backend) is DenseAttention
            and isinstance(mlp, SwiGLUMLP)
            and not layer.tp.is_parallel
            and layer.input_layernorm.weight.dtype == torch.float32
        ):
            return None
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        kernels_of = [linear.kernel for linear in linears]
        if any(k is None or k.blocks is None for k in kernels_of):
            return None
        if len({k.activation_bits for k in kernels_of}) != 1:
            return None
        projections = [
            kernels.PackedProjection(
                k.blocks.codes, k.blocks.scale, k.blocks.minimum, k.blocks.out_features, k.bias
            )
            for k in kernels_of
        ]
        compiled = kernels.DecoderLayerCpu(
            layer.input_layernorm.weight.data,
            layer.post_attention_layernorm.weight.data,
            layer.input_layernorm.eps,
            *projections,
            attn.num_heads,
            attn.num_kv_heads,
            attn.head_dim,
            attn.scale,
            kernels_of[0].activation_bits,
        )
        return cls(compiled, linears)

    def runs(self, cache: LayerKVCache, metadata: AttentionMetadata) -> bool:
        """Decodes only, a cache the compiled attention reads, adapter slots (if any) it can run."""
        return not metadata.prefills and cache.key.dtype in CPU_KERNEL_CACHE_DTYPES and self._lora_ready()

    def __call__(
        self,
        hidden: torch.Tensor,  # [rows, hidden]
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerKVCache,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, residual = self.compiled.forward(
            hidden, residual, *rope, metadata.slot_mapping, cache.key, cache.value,
            metadata.decode_block_tables, metadata.decode_seq_lens, metadata.block_size,
            self.lora_rows is not None and self.lora_rows.active,
        )  # fmt: skip
        return out, residual
