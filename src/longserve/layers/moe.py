"""Mixture-of-Experts block: a router picks top-k experts per token (``moe_router``), stacked SwiGLU experts run
on the tokens routed to them, shared experts run on every token.

One layer serves Mixtral, Qwen2/3-MoE and DeepSeek-V2/V3: the families differ only in ``RouterConfig`` and in
the names their checkpoints give the tensors (``MoEWeightNames``).

Dispatch never loops over tokens. The (token, k) pairs are grouped by expert, every expert runs on its rows,
and each row goes back to its (token, k) place; the k outputs are summed with their weights in a fixed order
(no atomics), so results are deterministic. Three expert implementations:
- CUDA with Triton ("auto" there): the fused kernels of ``moe_triton``, five launches and no host sync;
  shared experts of a multiple of moe_intermediate_size run as extra slots every token uses.
- ``grouped_mm`` where the device has it: the same grouping with torch ops and two grouped matmuls.
- a loop over the experts that received tokens. On CPU it uses each expert's oneDNN-repacked weights (see
  layers/matmul.py): faster than grouped_mm there, and each row's result does not depend on how many other
  rows the expert got, so greedy output does not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from longserve.attention.recording import RecordHook
from longserve.distributed.parallel import TensorParallel
from longserve.layers.linear import Linear, ShardTarget
from longserve.layers.matmul import PreparedMatmul
from longserve.layers.mlp import SwiGLUMLP
from longserve.layers.moe_router import RouterConfig, RouterLinear, RoutingRecord, route

__all__ = ["MoE", "RouterConfig", "route"]

EXPERT_IMPLS = ("auto", "grouped_mm", "loop", "triton")
EXPERT_PARTS = ("gate", "up", "down")


class MoE(nn.Module):
    """Routed SwiGLU experts (stacked weights) plus optional dense shared experts: [tokens, hidden] -> same.

    The router, shared experts and shared-expert gate are ``Linear`` modules, prepared by the model's loop
    over its Linear modules like every projection; ``prepare`` handles the routed experts.
    """

    def __init__(
        self,
        hidden_size: int,
        moe_intermediate_size: int,
        router: RouterConfig,
        num_shared_experts: int = 0,
        shared_intermediate_size: int | None = None,  # None: num_shared_experts * moe_intermediate_size
        shared_expert_gate: bool = False,  # Qwen2-MoE: shared output scaled by sigmoid(Linear(hidden -> 1))
        dtype: torch.dtype = torch.float32,
        *,
        router_dtype: torch.dtype | None = None,  # the router's matmul dtype (DeepSeek: float32); None: dtype
        expert_impl: str = "auto",  # "auto" | "grouped_mm" | "loop" | "triton"
        tp: TensorParallel
        | None = None,  # this rank's share: every expert's rows, or (expert parallel) experts
    ) -> None:
        super().__init__()
        if expert_impl not in EXPERT_IMPLS:
            raise ValueError(f"expert_impl must be one of {EXPERT_IMPLS}, got {expert_impl!r}")
        if shared_expert_gate and num_shared_experts < 1:
            raise ValueError("shared_expert_gate needs a shared expert")
        self.tp = tp = tp or TensorParallel()
        experts, inter = router.num_experts, moe_intermediate_size
        # Under tensor parallelism a rank holds either a slice of every expert's rows or whole experts
        # [first_expert, first_expert + local_experts); either way its output is a partial sum the decoder
        # layer all-reduces. Shared experts are always row-sliced; the router is replicated.
        self.first_expert, self.local_experts = 0, experts
        if tp.expert_parallel:
            self.local_experts = tp.local(experts, "num_experts")
            self.first_expert = tp.rank * self.local_experts
        else:
            inter = tp.local(inter, "moe_intermediate_size")
        self.router, self.expert_impl = router, expert_impl
        self.hidden_size, self.intermediate_size = hidden_size, inter
        self.router_dtype = router_dtype or dtype
        self.gate = RouterLinear(hidden_size, [experts], False, self.router_dtype)
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(experts, dtype=torch.float32), requires_grad=False)
            if router.use_correction_bias
            else None
        )
        empty = partial(torch.empty, dtype=dtype)
        # Rows [0, inter) of each expert's w_gate_up are its gate projection, [inter, 2 inter) its up projection.
        self.w_gate_up = nn.Parameter(empty(self.local_experts, 2 * inter, hidden_size), requires_grad=False)
        self.w_down = nn.Parameter(empty(self.local_experts, hidden_size, inter), requires_grad=False)
        shared = shared_intermediate_size or num_shared_experts * moe_intermediate_size
        if num_shared_experts > 0:
            shared = tp.local(shared, "the shared experts' intermediate size")
        self.shared_experts = SwiGLUMLP(hidden_size, shared, dtype) if num_shared_experts > 0 else None
        self.shared_expert_gate = Linear(hidden_size, [1], False, dtype) if shared_expert_gate else None
        self._kernels: list[tuple[PreparedMatmul, PreparedMatmul]] | None = None  # per expert, once prepared
        self._grouped_mm_ok: dict[tuple[str, torch.dtype], bool] = {}  # probed once per device and dtype
        self._triton_ok: dict[tuple[str, torch.dtype], bool] = {}
        # grouped_mm path: routed experts with the shared experts appended as extra experts (see
        # _fused_shared_weights), keyed by the source tensors' storage and version.
        self._fused: tuple[tuple, tuple[torch.Tensor, torch.Tensor, int]] | None = None
        self.record: RecordHook[RoutingRecord] | None = None  # a recording hook (longserve.viz); None: off

    # ---- forward ------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, hidden] -> [tokens, hidden]
        logits = self.gate(x.to(self.router_dtype))  # [tokens, experts]
        weights, ids = route(logits, self.router, self.e_score_correction_bias)  # [tokens, top_k] each
        if self.record is not None:
            self.record(RoutingRecord(ids, weights))
        if self.tp.expert_parallel:
            return self._expert_parallel_forward(x, weights, ids)
        if x.shape[0] and self._use_triton(x):
            return self._triton_forward(x, weights, ids)
        if x.shape[0] and self._use_grouped_mm(x):
            return self._grouped_forward(x, weights, ids)
        out = self.run_experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self._shared(x)
        return out

    def _expert_parallel_forward(
        self,
        x: torch.Tensor,  # [tokens, hidden], the same on every rank
        weights: torch.Tensor,  # [tokens, top_k]
        ids: torch.Tensor,  # [tokens, top_k], global expert ids
    ) -> torch.Tensor:
        """This rank's part: its experts on the (token, k) pairs routed to them, plus its slice of the shared
        experts. Every rank routes every token, so dispatch is picking pairs and combine is the layer's
        all-reduce."""
        local = ids - self.first_expert
        token, choice = ((local >= 0) & (local < self.local_experts)).nonzero(as_tuple=True)  # [pairs] each
        expert = local[token, choice]
        order = torch.argsort(expert, stable=True)  # pairs grouped by local expert
        token, choice, expert = token[order], choice[order], expert[order]
        counts = torch.bincount(expert, minlength=self.local_experts)  # [local_experts]
        ys = self._loop(x.index_select(0, token), counts)  # [pairs, hidden]
        out = torch.zeros(x.shape[0], self.hidden_size, dtype=torch.float32, device=x.device)
        out.index_add_(0, token, ys.float() * weights[token, choice].float().unsqueeze(-1))
        out = out.to(x.dtype)
        if self.shared_experts is not None:
            out = out + self._shared(x)
        return out

    def _shared(self, x: torch.Tensor) -> torch.Tensor:  # the (gated) shared experts, [tokens, hidden]
        shared = self.shared_experts(x)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return shared

    def run_experts(
        self,
        x: torch.Tensor,  # [tokens, hidden]
        weights: torch.Tensor,  # [tokens, top_k]
        ids: torch.Tensor,  # [tokens, top_k]
    ) -> torch.Tensor:
        """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) for every token t: [tokens, hidden]."""
        tokens, top_k = ids.shape
        if tokens == 0:
            return x.new_zeros(0, self.hidden_size)
        if self._use_triton(x):
            from longserve.layers.moe_triton import combine, fused_experts

            return combine(fused_experts(x, ids, self.w_gate_up, self.w_down), weights)
        if self._use_grouped_mm(x):
            return self._grouped_experts(x, weights, ids, self.w_gate_up, self.w_down)
        flat_ids = ids.reshape(-1)  # [pairs], pair p = (token p // top_k, choice p % top_k)
        order = torch.argsort(flat_ids, stable=True)  # [pairs]: pairs grouped by expert
        counts = torch.bincount(flat_ids, minlength=self.router.num_experts)  # [experts]
        rows = x.index_select(0, order // top_k)  # [pairs, hidden], grouped by expert
        ys = self._loop(rows, counts)  # [pairs, hidden], grouped by expert
        ys = torch.empty_like(ys).index_copy_(0, order, ys).view(tokens, top_k, self.hidden_size)
        # Weighted and summed in float32: a token's k expert outputs are rounded once, not k times.
        return (ys.float() * weights.float().unsqueeze(-1)).sum(dim=1).to(x.dtype)

    # ---- the Triton path (no host sync: CUDA-graph capturable) ----------------------------------------------

    def _triton_forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Routed experts as Triton kernels; shared experts as extra slots of the same kernels where their size
        allows (faster than separate dense matmuls from 16 to 4096 tokens on an H200: benchmarks/NOTES.md),
        else as dense matmuls added in the combine."""
        from longserve.layers import moe_triton

        gate = self.shared_expert_gate
        gate_logit = gate(x) if gate is not None else None  # [tokens, 1]
        fused = self._fused_shared_weights()
        if fused is not None:
            w_gate_up, w_down, slices = fused
            ys = moe_triton.fused_experts(x, ids, w_gate_up, w_down, shared_slices=slices)
            return moe_triton.combine(ys, weights, gate_logit)
        ys = moe_triton.fused_experts(x, ids, self.w_gate_up, self.w_down)  # [tokens, top_k, hidden]
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        return moe_triton.combine(ys, weights, gate_logit, shared)

    # ---- the grouped_mm path (no host sync: CUDA-graph capturable) ------------------------------------------

    def _grouped_forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Routed plus shared experts. Shared experts of a multiple of moe_intermediate_size, ungated or with a
        sigmoid gate, run as extra experts every token picks (weight 1 or its gate) in the same grouped_mm."""
        fused = self._fused_shared_weights()
        if fused is None:
            out = self._grouped_experts(x, weights, ids, self.w_gate_up, self.w_down)
            return out if self.shared_experts is None else out + self._shared(x)
        w_gate_up, w_down, extra = fused
        tokens = x.shape[0]
        experts = self.router.num_experts
        extra_ids = torch.arange(experts, experts + extra, device=ids.device, dtype=ids.dtype).expand(
            tokens, extra
        )
        if self.shared_expert_gate is not None:
            gate = torch.sigmoid(self.shared_expert_gate(x)).to(weights.dtype)  # [tokens, 1]
        else:
            gate = weights.new_ones(tokens, 1)
        ids = torch.cat([ids, extra_ids], dim=1)  # [tokens, top_k + extra]
        weights = torch.cat([weights, gate.expand(tokens, extra)], dim=1)
        return self._grouped_experts(x, weights, ids, w_gate_up, w_down)

    def _grouped_experts(
        self,
        x: torch.Tensor,  # [tokens, hidden]
        weights: torch.Tensor,  # [tokens, k]
        ids: torch.Tensor,  # [tokens, k], values in [0, w_gate_up.shape[0])
        w_gate_up: torch.Tensor,  # [experts, 2 inter, hidden]
        w_down: torch.Tensor,  # [experts, hidden, inter]
    ) -> torch.Tensor:
        """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]): the rows are put back in (token, k) order by one
        gather and summed over k with their weights in fixed order."""
        tokens, k = ids.shape
        flat_ids = ids.reshape(-1).to(torch.int32)  # [pairs], pair p = (token p // k, choice p % k)
        sorted_ids, order = torch.sort(flat_ids, stable=True)  # [pairs]: pairs grouped by expert
        bounds = torch.arange(1, w_gate_up.shape[0] + 1, device=ids.device, dtype=torch.int32)
        # [experts]: end of each expert's rows, found without a host sync (bincount syncs on CUDA)
        offsets = torch.searchsorted(sorted_ids, bounds, out_int32=True)
        rows = x.index_select(0, order // k)  # [pairs, hidden], grouped by expert
        ys = self._grouped(rows, offsets, w_gate_up, w_down)  # [pairs, hidden], grouped by expert
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
        ys = ys.index_select(0, inverse).view(tokens, k, self.hidden_size)  # (token, k) order
        # Weighted sum over k as one batched [1, k] @ [k, hidden] product: float32 accumulation, one rounding
        # per token, fixed order (no atomics).
        return torch.bmm(weights.to(x.dtype).unsqueeze(1), ys).squeeze(1)

    def _grouped(
        self,
        rows: torch.Tensor,  # [pairs, hidden], grouped by expert
        offsets: torch.Tensor,  # [experts] int32: end of each expert's rows
        w_gate_up: torch.Tensor,
        w_down: torch.Tensor,
    ) -> torch.Tensor:
        gate_up = F.grouped_mm(rows, w_gate_up.transpose(-2, -1), offs=offsets)  # [pairs, 2 inter]
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return F.grouped_mm(F.silu(gate).mul_(up), w_down.transpose(-2, -1), offs=offsets)

    def _fused_shared_weights(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """(routed + shared gate_up, routed + shared down, number of shared slices), built once per load and
        cached; None when the shared experts cannot run as extra routed experts."""
        shared = self.shared_experts
        inter = self.intermediate_size
        if shared is None or shared.intermediate_size % inter:
            return None
        if shared.gate_up_proj.lora is not None or shared.down_proj.lora is not None:
            return None  # LoRA updates run in the shared experts' own projections
        gate_up, down = shared.gate_up_proj.weight, shared.down_proj.weight
        if gate_up is None or down is None or gate_up.dtype != self.w_gate_up.dtype:
            return None
        if (
            getattr(shared.gate_up_proj, "bias", None) is not None
            or getattr(shared.down_proj, "bias", None) is not None
        ):
            return None
        if self.shared_expert_gate is not None and (
            self.shared_expert_gate.weight is None
            or getattr(self.shared_expert_gate, "bias", None) is not None
        ):
            return None
        sources = (self.w_gate_up, self.w_down, gate_up, down)
        key = tuple((t.data_ptr(), _version(t)) for t in sources)
        cached = self._fused
        if cached is not None and cached[0] == key:
            return cached[1]
        extra, hidden = shared.intermediate_size // inter, self.hidden_size
        s_gate, s_up = gate_up.split(shared.intermediate_size, dim=0)  # [shared, hidden] each
        s_gate_up = torch.cat([s_gate.view(extra, inter, hidden), s_up.view(extra, inter, hidden)], dim=1)
        s_down = down.view(hidden, extra, inter).transpose(0, 1)  # [extra, hidden, inter]
        fused = (
            torch.cat([self.w_gate_up, s_gate_up], dim=0),
            torch.cat([self.w_down, s_down], dim=0),
            extra,
        )
        self._fused = (key, fused)
        return fused

    def _loop(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ys = rows.new_empty(rows.shape[0], self.hidden_size)
        start = 0
        for expert, count in enumerate(counts.tolist()):  # one host sync; experts without tokens cost nothing
            if count:
                ys[start : start + count] = self._expert(expert, rows[start : start + count])
                start += count
        return ys

    def _expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:  # [rows, hidden] -> [rows, hidden]
        if self._kernels is not None:
            gate_up_kernel, down_kernel = self._kernels[expert]
            gate, up = gate_up_kernel(x).split(self.intermediate_size, dim=-1)
            return down_kernel(F.silu(gate) * up)
        gate, up = F.linear(x, self.w_gate_up[expert]).split(self.intermediate_size, dim=-1)
        return F.linear(F.silu(gate) * up, self.w_down[expert])

    def capturable(self, x: torch.Tensor) -> bool:
        """Whether this block's forward on inputs like ``x`` makes no host sync, so a CUDA graph may capture it:
        the Triton or grouped_mm experts on one device (expert parallelism picks its pairs on the host, and
        the per-expert loop sizes its batches there)."""
        return x.is_cuda and not self.tp.expert_parallel and (self._use_triton(x) or self._use_grouped_mm(x))

    def _use_grouped_mm(self, x: torch.Tensor) -> bool:
        """Whether the experts run as two grouped_mm calls over the stacked weights."""
        if self.expert_impl != "auto":
            return self.expert_impl == "grouped_mm"
        if self._kernels is not None:
            return False
        key = (x.device.type, x.dtype)
        if key not in self._grouped_mm_ok:
            self._grouped_mm_ok[key] = self._probe_grouped_mm(x)
        return self._grouped_mm_ok[key]

    def _use_triton(self, x: torch.Tensor) -> bool:
        """ "triton", or "auto" on CUDA where Triton imports and its kernels run.

        Measured on an H200 (benchmarks/NOTES.md), eagerly: 0.35 / 0.40 / 1.30 ms at 16 / 256 / 4096 tokens
        against grouped_mm's 0.44 / 0.55 / 1.73 ms.
        """
        if self.expert_impl != "auto":
            return self.expert_impl == "triton"
        if not x.is_cuda or self._kernels is not None:
            return False
        key = (x.device.type, x.dtype)
        if key not in self._triton_ok:
            self._triton_ok[key] = self._probe_triton(x)
        return self._triton_ok[key]

    def _probe_triton(self, x: torch.Tensor) -> bool:
        """Whether the Triton kernels import and compile here (a build without Triton falls back to grouped_mm)."""
        if self.w_gate_up is None or x.dtype != self.w_gate_up.dtype:
            return False
        try:
            from longserve.layers.moe_triton import combine, fused_experts

            ids = torch.zeros(1, 1, dtype=torch.int64, device=x.device)
            ys = fused_experts(x.new_zeros(1, self.hidden_size), ids, self.w_gate_up, self.w_down)
            combine(ys, ids.float())
        except Exception:  # ImportError, or any compile/launch failure Triton raises (no common base class)
            return False
        return True

    def _probe_grouped_mm(self, x: torch.Tensor) -> bool:
        """Whether grouped_mm runs here with these weights (builds may lack it, or its device/dtype/alignment)."""
        if not hasattr(F, "grouped_mm") or self.w_gate_up is None or x.dtype != self.w_gate_up.dtype:
            return False
        try:
            rows = torch.zeros(8, self.hidden_size, dtype=x.dtype, device=x.device)
            offsets = torch.full((self.router.num_experts,), 8, dtype=torch.int32, device=x.device)
            self._grouped(rows, offsets, self.w_gate_up, self.w_down)
        except (RuntimeError, NotImplementedError, TypeError):
            return False
        return True

    # ---- after loading ------------------------------------------------------------------------------------

    def prepare(self, quantization: str | None = None) -> None:
        """After loading, on CPU: each expert's weights to PreparedMatmul (oneDNN fp32 repack, or int8); the
        stacked copies are then dropped. Elsewhere the stacked weights feed Triton or grouped_mm as they are."""
        if (
            self._kernels is not None
            or self.expert_impl in ("grouped_mm", "triton")
            or self.w_gate_up.device.type != "cpu"
        ):
            return
        kernels = [
            (PreparedMatmul(gate_up, None, quantization), PreparedMatmul(down, None, quantization))
            for gate_up, down in zip(self.w_gate_up, self.w_down, strict=True)
        ]
        flat = [kernel for pair in kernels for kernel in pair]
        if all(kernel.packed is None and kernel.packed_int8 is None for kernel in flat):
            return  # nothing to gain (e.g. bf16 without int8): keep the stacked weights for grouped_mm
        self._kernels = kernels
        if all(kernel.weight is None for kernel in flat):
            self.w_gate_up = self.w_down = None

    # ---- loading ------------------------------------------------------------------------------------------

    def load_gate(self, weight: torch.Tensor) -> None:
        """The router's weight, [experts, hidden]."""
        self.gate.load_shard(0, weight)

    def load_correction_bias(self, bias: torch.Tensor) -> None:
        """DeepSeek-V3's e_score_correction_bias, [experts]."""
        _copy(self.e_score_correction_bias, bias)

    def load_expert_weight(self, index: int, part: str, weight: torch.Tensor) -> None:
        """One expert's ``gate`` or ``up`` ([inter, hidden]) or ``down`` ([hidden, inter]) projection, as the
        checkpoint has it (this rank keeps its slice, or nothing for another rank's expert)."""
        inter = self.intermediate_size
        index -= self.first_expert
        if not 0 <= index < self.local_experts:
            return
        if not self.tp.expert_parallel:
            weight = self.tp.rows(weight, dim=1 if part == "down" else 0)
        if part == "down":
            _copy(self.w_down[index], weight)
        else:
            offset = EXPERT_PARTS.index(part) * inter  # ValueError for an unknown part
            _copy(self.w_gate_up[index, offset : offset + inter], weight)

    def load_expert(self, index: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        for part, weight in zip(EXPERT_PARTS, (gate, up, down), strict=True):
            self.load_expert_weight(index, part, weight)

    def load_stacked_gate_up(self, weight: torch.Tensor) -> None:
        """All experts' gate|up at once, [experts, 2 inter, hidden] (transformers 5's in-memory layout)."""
        weight = weight.narrow(0, self.first_expert, self.local_experts)
        if self.tp.is_parallel and not self.tp.expert_parallel:
            gate, up = weight.chunk(2, dim=1)
            weight = torch.cat([self.tp.rows(gate, dim=1), self.tp.rows(up, dim=1)], dim=1)
        _copy(self.w_gate_up, weight)

    def load_stacked_down(self, weight: torch.Tensor) -> None:
        """All experts' down projections, [experts, hidden, inter]."""
        weight = weight.narrow(0, self.first_expert, self.local_experts)
        if not self.tp.expert_parallel:
            weight = self.tp.rows(weight, dim=2)
        _copy(self.w_down, weight)

    def load_shared(self, part: str, weight: torch.Tensor) -> None:
        """The (concatenated) shared experts' ``gate``, ``up`` or ``down`` projection."""
        if part == "down":
            self.shared_experts.down_proj.load_shard(0, self.tp.rows(weight, dim=1))
        else:
            self.shared_experts.gate_up_proj.load_shard(EXPERT_PARTS.index(part), self.tp.rows(weight))

    def shared_target(self, part: str) -> ShardTarget | Callable[[torch.Tensor], None]:
        """The loader of the shared experts' ``part``: on one device the projection's own ``ShardTarget``
        (which LoRA finds), under tensor parallelism this rank's slice of it."""
        if self.tp.is_parallel:
            return partial(self.load_shared, part)
        if part == "down":
            return self.shared_experts.down_proj.shard(0)
        return self.shared_experts.gate_up_proj.shard(EXPERT_PARTS.index(part))

    def load_shared_gate(self, weight: torch.Tensor) -> None:
        """Qwen2-MoE's shared_expert_gate, [1, hidden]."""
        self.shared_expert_gate.load_shard(0, weight)


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors track no version
        return None


def _copy(param: torch.Tensor, tensor: torch.Tensor) -> None:
    if tensor.shape != param.shape:
        raise ValueError(f"shape {tuple(tensor.shape)} != expected {tuple(param.shape)}")
    param.copy_(tensor)


def moe_blocks_capturable(model: nn.Module, hidden_size: int) -> bool:
    """Whether every MoE block of ``model`` runs sync-free on the model's device and dtype (CUDA graphs)."""
    weight = next(model.parameters())
    probe = torch.zeros(1, hidden_size, dtype=weight.dtype, device=weight.device)
    return all(block.capturable(probe) for block in model.modules() if isinstance(block, MoE))
