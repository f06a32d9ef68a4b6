"""The fused-MoE Triton path on CUDA against the grouped_mm and per-expert loop paths (skipped without CUDA).

CPU coverage of the same kernels runs under Triton's interpreter (TRITON_INTERPRET=1) outside pytest; here
they run compiled, in bf16 as served and in float32 where they must agree with the loop to rounding.
"""

import pytest
import torch

from longserve.layers.moe import MoE, RouterConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
pytest.importorskip("triton")

HIDDEN, INTER, EXPERTS, TOP_K = 256, 128, 16, 4
TOKEN_COUNTS = (1, 16, 300)


def cuda_moe(dtype: torch.dtype, seed: int = 0, **kwargs) -> MoE:
    """A Qwen2-MoE-like block on CUDA with random weights (std 1/sqrt(fan_in))."""
    router = RouterConfig(num_experts=EXPERTS, top_k=TOP_K, scoring="softmax", norm_topk_prob=False)
    moe = MoE(HIDDEN, INTER, router, dtype=dtype, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return moe.cuda().eval()


def inputs(tokens: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens)).to("cuda", dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def run(moe: MoE, impl: str, x: torch.Tensor) -> torch.Tensor:
    moe.expert_impl = impl
    with torch.inference_mode():
        return moe(x)


SHARED = {
    "none": {},
    "gated, folded": dict(num_shared_experts=1, shared_intermediate_size=2 * INTER, shared_expert_gate=True),
    "not foldable": dict(num_shared_experts=1, shared_intermediate_size=INTER + 48),
}


@pytest.mark.parametrize("shared", sorted(SHARED))
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
def test_triton_matches_grouped_mm_and_loop_bf16(tokens, shared):
    moe = cuda_moe(torch.bfloat16, **SHARED[shared])
    x = inputs(tokens, torch.bfloat16)
    ours = run(moe, "triton", x)
    assert ours.dtype == torch.bfloat16 and ours.shape == x.shape
    assert rel_err(ours, run(moe, "loop", x)) < 1e-2
    if moe._probe_grouped_mm(x):
        assert rel_err(ours, run(moe, "grouped_mm", x)) < 1e-2


@pytest.mark.parametrize("shared", ("gated, folded", "not foldable"))
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
def test_triton_matches_loop_float32(tokens, shared):
    moe = cuda_moe(torch.float32, **SHARED[shared])
    x = inputs(tokens, torch.float32)
    torch.testing.assert_close(run(moe, "triton", x), run(moe, "loop", x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "tokens,top_k,experts,shared,block_m",
    [(1, 1, 4, 0, 16), (300, 4, 16, 2, 32), (2000, 4, 60, 4, 64), (50, 2, 8, 1, 128)],
)
def test_align_puts_every_pair_in_a_block_of_its_expert(tokens, top_k, experts, shared, block_m):
    from longserve.layers import moe_triton as mt

    gen = torch.Generator().manual_seed(tokens)
    routed = experts - shared
    ids = torch.stack([torch.randperm(routed, generator=gen)[:top_k] for _ in range(tokens)])
    rows = mt.align(ids.cuda(), experts, block_m, shared)
    slots, num_pairs = top_k + shared, tokens * (top_k + shared)
    padded = int(rows.num_padded)
    assert padded % block_m == 0 and padded <= rows.sorted_pairs.numel()
    pairs = rows.sorted_pairs[:padded].cpu()
    block_expert = rows.block_expert.cpu()[torch.arange(padded) // block_m]  # [padded] the expert of each row
    real = pairs < num_pairs
    assert torch.equal(pairs[real].sort().values, torch.arange(num_pairs, dtype=torch.int32))
    assert bool((pairs[~real] == num_pairs).all())
    token, slot = pairs[real].long() // slots, pairs[real].long() % slots
    expected = torch.where(slot < top_k, ids[token, slot.clamp(max=top_k - 1)], routed + slot - top_k)
    assert torch.equal(block_expert[real].long(), expected)
    counts = torch.bincount(expected, minlength=experts)
    assert padded == int(((counts + block_m - 1) // block_m * block_m).sum())


@pytest.mark.parametrize("tokens", (1, 3, 40))
def test_experts_without_tokens_and_every_tile_config(tokens):
    """Routing to 3 of 16 experts (the rest get nothing), odd sizes, every config the heuristic can pick."""
    from longserve.layers import moe_triton as mt

    gen = torch.Generator().manual_seed(tokens)
    hidden, inter, experts, k = 200, 72, 16, 2
    w_gate_up = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).cuda()
    w_down = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).cuda()
    x = torch.randn(tokens, hidden, generator=gen).cuda()
    ids = torch.stack([torch.randperm(3, generator=gen)[:k] for _ in range(tokens)]).cuda() * 5  # 0, 5, 10
    gate, up = torch.einsum("tkoh,th->tko", w_gate_up[ids], x).split(inter, dim=-1)
    expected = torch.einsum("tkhi,tki->tkh", w_down[ids], torch.nn.functional.silu(gate) * up)
    configs = {mt.default_configs(t, t * k, experts) for t in (1, 300, 1000, 4096)}
    configs |= {mt.default_configs(t, t * 8, 64) for t in (16, 256, 1024, 4096)}
    for gate_up, down in sorted(configs, key=str):
        for tma in (False, True) if torch.cuda.get_device_capability()[0] >= 9 else (False,):
            run = dict(config=gate_up, down_config=down, use_tma=tma)
            got = mt.fused_experts(x, ids, w_gate_up, w_down, **run)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=f"{run}")
            got16 = mt.fused_experts(x.bfloat16(), ids, w_gate_up.bfloat16(), w_down.bfloat16(), **run)
            assert rel_err(got16, expected) < 1e-2, run


def test_auto_picks_triton_on_cuda():
    moe = cuda_moe(torch.bfloat16)
    for tokens in (1, 4096):
        assert moe._use_triton(inputs(tokens, torch.bfloat16))
    moe.expert_impl = "grouped_mm"
    assert not moe._use_triton(inputs(4, torch.bfloat16))


def test_triton_is_deterministic():
    moe = cuda_moe(torch.bfloat16, **SHARED["gated, folded"])
    x = inputs(300, torch.bfloat16)
    assert torch.equal(run(moe, "triton", x), run(moe, "triton", x))
