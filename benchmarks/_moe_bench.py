"""MoE-block benchmark helpers: build our MoE and HF's Qwen2MoeSparseMoeBlock with the same random weights,
compare their outputs, time them, and estimate the floor (bytes / FLOPs) of one forward pass."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MoEShape:
    """One Qwen2-MoE style block: routed SwiGLU experts plus one gated shared expert."""

    hidden: int
    experts: int
    inter: int
    top_k: int
    shared_inter: int

    def flops(self, tokens: int) -> float:
        """Matmul FLOPs of one forward pass (router, routed experts, shared expert, shared gate)."""
        per_token = self.hidden * (self.experts + self.top_k * 3 * self.inter + 3 * self.shared_inter + 1)
        return 2.0 * tokens * per_token

    def min_bytes(self, tokens: int, experts_hit: int, elem: int) -> float:
        """Fewest bytes moved: every hit expert's and the shared weights read once, x read, y written."""
        weights = experts_hit * 3 * self.hidden * self.inter + 3 * self.hidden * self.shared_inter
        weights += self.hidden * (self.experts + 1)
        return elem * (weights + 2 * tokens * self.hidden)


QWEN15_MOE_A27B = MoEShape(hidden=2048, experts=60, inter=1408, top_k=4, shared_inter=5632)
CPU_SHAPE = MoEShape(hidden=512, experts=16, inter=256, top_k=2, shared_inter=1024)


def hf_experts_implementations() -> list[str]:
    """transformers' registered experts implementations that run anywhere here ("eager" first)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:  # a transformers without selectable experts implementations
        return ["eager"]
    names = ["eager"] + sorted(ALL_EXPERTS_FUNCTIONS.keys())
    # deepgemm / sonicmoe need extra kernel packages; they are tried and reported as unavailable if missing.
    return list(dict.fromkeys(names))


def build_blocks(
    shape: MoEShape, device: str, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, HF) MoE blocks holding the same random weights (std 1/sqrt(fan_in)), in eval mode."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    from longserve.layers.moe import MoE, RouterConfig

    config = Qwen2MoeConfig(
        hidden_size=shape.hidden,
        num_experts=shape.experts,
        moe_intermediate_size=shape.inter,
        num_experts_per_tok=shape.top_k,
        shared_expert_intermediate_size=shape.shared_inter,
        norm_topk_prob=False,
        hidden_act="silu",
    )
    config._experts_implementation = "eager"
    gen = torch.Generator().manual_seed(seed)

    def rand(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) / size[-1] ** 0.5).to(device=device, dtype=dtype)

    hf = Qwen2MoeSparseMoeBlock(config).to(device=device, dtype=dtype).eval()
    ours = MoE(
        shape.hidden,
        shape.inter,
        RouterConfig(num_experts=shape.experts, top_k=shape.top_k, scoring="softmax", norm_topk_prob=False),
        num_shared_experts=1,
        shared_intermediate_size=shape.shared_inter,
        shared_expert_gate=True,
        dtype=dtype,
    ).to(device)
    with torch.no_grad():
        # The router gets a larger scale so that routing is decisive, as in trained models.
        tensors = {
            "gate": rand(shape.experts, shape.hidden) * 4,
            "gate_up": rand(shape.experts, 2 * shape.inter, shape.hidden),
            "down": rand(shape.experts, shape.hidden, shape.inter),
            "s_gate": rand(shape.shared_inter, shape.hidden),
            "s_up": rand(shape.shared_inter, shape.hidden),
            "s_down": rand(shape.hidden, shape.shared_inter),
            "s_gate_w": rand(1, shape.hidden),
        }
        hf.gate.weight.copy_(tensors["gate"])
        hf.experts.gate_up_proj.copy_(tensors["gate_up"])
        hf.experts.down_proj.copy_(tensors["down"])
        hf.shared_expert.gate_proj.weight.copy_(tensors["s_gate"])
        hf.shared_expert.up_proj.weight.copy_(tensors["s_up"])
        hf.shared_expert.down_proj.weight.copy_(tensors["s_down"])
        hf.shared_expert_gate.weight.copy_(tensors["s_gate_w"])
        ours.load_gate(tensors["gate"])
        ours.load_stacked_gate_up(tensors["gate_up"])
        ours.load_stacked_down(tensors["down"])
        for part, key in (("gate", "s_gate"), ("up", "s_up"), ("down", "s_down")):
            ours.load_shared(part, tensors[key])
        ours.load_shared_gate(tensors["s_gate_w"])
    for param in hf.parameters():
        param.requires_grad_(False)
    return ours.eval(), hf


def prepare_for_cpu(ours: torch.nn.Module) -> None:
    """What the engine does after loading on CPU: every Linear to its kernel, the experts repacked."""
    from longserve.layers.linear import Linear

    for module in ours.modules():
        if isinstance(module, Linear):
            module.prepare(None)
    ours.prepare(None)


def hf_forward(hf: torch.nn.Module, impl: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """HF's block under experts implementation ``impl``, on [tokens, hidden] inputs."""

    def run(x: torch.Tensor) -> torch.Tensor:
        hf.experts.config._experts_implementation = impl
        return hf(x.unsqueeze(0)).squeeze(0)

    return run


def ours_forward(ours: torch.nn.Module, impl: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        ours.expert_impl = impl
        return ours(x)

    return run


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def load_balance(ours: torch.nn.Module, x: torch.Tensor) -> dict:
    """Tokens each routed expert gets for the batch ``x``: min / mean / max, and how many experts got any."""
    from longserve.layers.moe import route

    with torch.inference_mode():
        _, ids = route(ours.gate(x.to(ours.router_dtype)), ours.router)
    counts = torch.bincount(ids.reshape(-1), minlength=ours.router.num_experts).float()
    return {
        "min": int(counts.min()),
        "mean": float(counts.mean()),
        "max": int(counts.max()),
        "experts_hit": int((counts > 0).sum()),
    }


def time_gpu(fn: Callable[[], object]) -> float:
    """Median milliseconds per call, timed with CUDA events (triton's do_bench where present)."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=50, rep=300, return_mode="median"))
    except ImportError:
        for _ in range(10):
            fn()
        times = []
        for _ in range(50):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def time_cpu(fn: Callable[[], object], min_s: float = 1.0, max_reps: int = 200) -> float:
    """Median milliseconds per call on CPU, after warm-up; at least 5 calls, about ``min_s`` in all."""
    for _ in range(3):
        fn()
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - began < min_s and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def gpu_ceilings() -> dict:
    """Measured device ceilings: copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s."""
    ceilings = {"bandwidth_Bps": _copy_rate(2**30), "bf16_flops": _matmul_rate(8192)}
    torch.cuda.empty_cache()
    return ceilings


def _copy_rate(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / (time_gpu(lambda: dst.copy_(src)) / 1e3)


def _matmul_rate(n: int) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    return 2 * n**3 / (time_gpu(lambda: a @ b) / 1e3)


def graph_forward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], object]:
    """``fn(x)`` captured once into a CUDA graph: replaying it shows the time without launch gaps."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x)
    return graph.replay


def host_ms(fn: Callable[[], object], calls: int = 20) -> float:
    """Milliseconds of CPU per call to launch ``fn`` (the device queue is drained first and never fills)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - began
    torch.cuda.synchronize()
    return 1e3 * elapsed / calls


def kernel_breakdown(fn: Callable[[], object], calls: int = 20, top: int = 12) -> list[dict]:
    """Device time per call of the ``top`` costliest kernels of ``fn`` (torch.profiler), microseconds."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    stats = [
        {"kernel": e.key[:90], "us_per_call": e.device_time_total / calls, "count_per_call": e.count / calls}
        for e in prof.key_averages()
        if e.device_time_total > 0
    ]
    return sorted(stats, key=lambda s: -s["us_per_call"])[:top]
