"""DeepSeek-V3's multi-token-prediction (MTP) module, the draft source of ``method: mtp``.

A checkpoint with ``num_nextn_predict_layers`` >= 1 carries, after its last decoder layer (as layer
``num_hidden_layers``), a module trained to predict the token after next: at position p it takes the target's
final hidden state h_p and the embedding of token p + 1, and gives logits for token p + 2:

    x = eh_proj([enorm(embed(t_{p+1})); hnorm(h_p)])        (the embedding first, as DeepSeek's checkpoints want)
    g = one decoder layer (MLA + MoE, its own KV cache) over x
    logits = shared_head.head(shared_head.norm(g))

A further draft feeds g back as the next position's hidden state (what vLLM does with one MTP layer).
Only the first MTP layer is used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from longserve.attention.backend import AttentionBackend
from longserve.attention.metadata import AttentionMetadata
from longserve.attention.paged_cache import LayerKVCache
from longserve.distributed.parallel import TensorParallel
from longserve.layers.linear import Linear
from longserve.layers.mla import MLARotary
from longserve.layers.moe import MoE
from longserve.layers.norm import RMSNorm
from longserve.layers.weight_loading import copier, load_into
from longserve.models.deepseek import DeepseekConfig, DeepseekDecoderLayer, decoder_layer_targets

_OWN_TENSORS = ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight",
                "shared_head.norm.weight", "shared_head.head.weight")  # fmt: skip


def mtp_layer_count(hf_config: dict) -> int:
    """How many MTP layers a DeepSeek config.json declares (0: none)."""
    count = hf_config.get("num_nextn_predict_layers") or 0
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 0


class DeepseekMTP(nn.Module):
    """The first MTP layer of a DeepSeek-V3 checkpoint, run on one device."""

    def __init__(self, config: DeepseekConfig, backend: AttentionBackend, dtype: torch.dtype) -> None:
        super().__init__()
        self.config, self.dtype = config, dtype
        self.index = config.num_layers  # its tensors are model.layers.{index}.*
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.embed_tokens = nn.Parameter(
            torch.empty(config.vocab_size, hidden, dtype=dtype), requires_grad=False
        )
        self.enorm = RMSNorm(hidden, eps, dtype)
        self.hnorm = RMSNorm(hidden, eps, dtype)
        self.eh_proj = Linear(2 * hidden, [hidden], bias=False, dtype=dtype)
        self.block = DeepseekDecoderLayer(config, self.index, backend, dtype, TensorParallel())
        self.head_norm = RMSNorm(hidden, eps, dtype)
        self.head = nn.Parameter(torch.empty(config.vocab_size, hidden, dtype=dtype), requires_grad=False)
        self.rotary = MLARotary(
            config.mla.qk_rope_head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # [tokens]: token p + 1 at row p
        positions: torch.Tensor,  # [tokens]: p
        previous_hidden: torch.Tensor,  # [tokens, hidden]: the target's (or this module's) hidden state at p
        cache: LayerKVCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [tokens, hidden] before the shared head's norm (a further draft's ``previous_hidden``)."""
        embeds = F.embedding(input_ids, self.embed_tokens)  # [tokens, hidden]
        embeds = embeds.masked_fill((positions == 0)[:, None], 0)  # position 0 has no token before it
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(previous_hidden)], dim=-1))
        rope = self.rotary.lookup(positions, x.dtype)
        hidden, residual = self.block(x, None, rope, cache, metadata)
        return hidden + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] -> float32 logits [rows, vocab]."""
        return F.linear(self.head_norm(hidden), self.head).float()

    def prepare_for_inference(self) -> None:
        for module in self.modules():
            if isinstance(module, Linear | MoE):
                module.prepare(None)

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy the MTP layer's tensors (``model.layers.{index}.*``) from a whole checkpoint's weights; a
        missing one raises ``ValueError``, and tensors of the decoder or of later MTP layers are not read."""
        prefix = f"model.layers.{self.index}."
        names = {name for name in weights if name.startswith(prefix)}
        targets = decoder_layer_targets(TensorParallel(), self.block, prefix, names)
        own = (self.embed_tokens, self.enorm.weight, self.hnorm.weight, self.eh_proj.weight,
               self.head_norm.weight, self.head)  # fmt: skip
        for name, param in zip(_OWN_TENSORS, own, strict=True):
            targets[prefix + name] = copier(param)
        try:
            load_into(weights, targets, self.dtype, _ignorable, names=names)
        except ValueError as exc:
            raise ValueError(f"the multi-token-prediction layer: {exc}") from exc


def _ignorable(name: str) -> bool:
    return re.search(r"rotary_emb\.inv_freq$", name) is not None
