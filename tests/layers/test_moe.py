"""The MoE layer: fast dispatch against a readable reference MoE, routing against HF's routers bit for bit.

The reference loops over tokens and their chosen experts; the layer sorts (token, k) pairs by expert and runs
grouped matmuls or a per-expert loop. Routing is checked against the router modules of HF transformers
(Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 both methods, DeepSeek-V3), on random logits and on logits full of
ties.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from longserve.layers.moe import MoE, RouterConfig, route

hf_mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_v2  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3  # noqa: E402
from transformers.models.qwen2_moe import modeling_qwen2_moe as hf_qwen2  # noqa: E402
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf_qwen3  # noqa: E402

HIDDEN, INTER = 32, 24
ROUNDING = dict(rtol=1e-5, atol=1e-5)


# ---- the reference ---------------------------------------------------------------------------------------


def reference_moe(moe: MoE, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Token by token: route, run each chosen expert's SwiGLU, add the weighted outputs, add shared experts."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = x[t : t + 1] @ weights["gate"].T
        expert_weights, ids = route(logits, moe.router, weights.get("bias"))
        for weight, expert in zip(expert_weights[0].tolist(), ids[0].tolist(), strict=True):
            gate_up = weights["w_gate_up"][expert] @ x[t]
            gate, up = gate_up[:INTER], gate_up[INTER:]
            out[t] += weight * (weights["w_down"][expert] @ (F.silu(gate) * up))
        if "shared_gate_up" in weights:
            gate, up = (weights["shared_gate_up"] @ x[t]).chunk(2)
            shared = weights["shared_down"] @ (F.silu(gate) * up)
            if "shared_gate" in weights:
                shared = shared * torch.sigmoid(weights["shared_gate"] @ x[t])
            out[t] += shared
    return out


def random_moe(router: RouterConfig, seed: int = 0, **kwargs) -> tuple[MoE, dict[str, torch.Tensor]]:
    """An MoE with random weights loaded through its load methods, and a copy of those weights."""
    g = torch.Generator().manual_seed(seed)
    moe = MoE(HIDDEN, INTER, router, **kwargs)
    experts = router.num_experts

    def rand(*shape):
        return torch.randn(*shape, generator=g) * shape[-1] ** -0.5

    w = {"gate": rand(experts, HIDDEN), "w_gate_up": rand(experts, 2 * INTER, HIDDEN)}
    w["w_down"] = rand(experts, HIDDEN, INTER)
    moe.load_gate(w["gate"])
    for e in range(experts):
        moe.load_expert(e, w["w_gate_up"][e, :INTER], w["w_gate_up"][e, INTER:], w["w_down"][e])
    if router.use_correction_bias:
        w["bias"] = torch.randn(experts, generator=g) * 0.1
        moe.load_correction_bias(w["bias"])
    if moe.shared_experts is not None:
        shared = moe.shared_experts.intermediate_size
        w["shared_gate_up"], w["shared_down"] = rand(2 * shared, HIDDEN), rand(HIDDEN, shared)
        moe.load_shared("gate", w["shared_gate_up"][:shared])
        moe.load_shared("up", w["shared_gate_up"][shared:])
        moe.load_shared("down", w["shared_down"])
    if moe.shared_expert_gate is not None:
        w["shared_gate"] = rand(1, HIDDEN)
        moe.load_shared_gate(w["shared_gate"])
    return moe, w


MIXTRAL = RouterConfig(num_experts=8, top_k=2, norm_topk_prob=True)
QWEN2 = RouterConfig(num_experts=16, top_k=4)
DEEPSEEK_V3 = RouterConfig(
    num_experts=16,
    top_k=4,
    scoring="sigmoid",
    norm_topk_prob=True,
    n_group=4,
    topk_group=2,
    use_correction_bias=True,
    routed_scaling_factor=2.5,
    sorted_topk=False,
)
LAYERS = {
    "mixtral": (MIXTRAL, {}),
    "qwen2_shared_gate": (
        QWEN2,
        dict(num_shared_experts=1, shared_intermediate_size=40, shared_expert_gate=True),
    ),
    "deepseek_v3": (DEEPSEEK_V3, dict(num_shared_experts=2)),
}


# ---- fast dispatch == reference --------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["auto", "loop", "prepared"])
@pytest.mark.parametrize("tokens", [1, 3, 50])
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_fast_dispatch_matches_the_reference(layer, tokens, impl):
    router, kwargs = LAYERS[layer]
    moe, weights = random_moe(router, expert_impl="loop" if impl == "loop" else "auto", **kwargs)
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
    expected = reference_moe(moe, weights, x)
    if impl == "prepared":
        for module in moe.modules():
            if hasattr(module, "prepare"):
                module.prepare()
    torch.testing.assert_close(moe(x), expected, **ROUNDING)
    if tokens <= 3:  # few tokens, many experts: some experts certainly got none
        _, ids = route(x @ weights["gate"].T, router, weights.get("bias"))
        assert ids.unique().numel() < router.num_experts


def test_experts_that_receive_no_tokens_and_an_empty_batch():
    moe, weights = random_moe(QWEN2)
    x = torch.randn(2, HIDDEN)
    torch.testing.assert_close(moe(x), reference_moe(moe, weights, x), **ROUNDING)
    assert moe(torch.empty(0, HIDDEN)).shape == (0, HIDDEN)


def test_prepared_cpu_experts_give_a_token_the_same_output_alone_or_in_a_batch():
    """oneDNN's per-row results do not depend on the row count, so greedy decoding is batch-invariant."""
    moe, _ = random_moe(QWEN2)
    moe.gate.prepare()
    moe.prepare()
    if moe._kernels is None:
        pytest.skip("no oneDNN repack on this build")
    x = torch.randn(33, HIDDEN)
    batched = moe(x)
    for t in (0, 17, 32):
        assert torch.equal(moe(x[t : t + 1])[0], batched[t])


def test_grouped_mm_and_loop_agree_where_grouped_mm_runs():
    if not hasattr(F, "grouped_mm"):
        pytest.skip("torch.nn.functional.grouped_mm is missing from this build")
    moe, _ = random_moe(QWEN2, num_shared_experts=1)
    x = torch.randn(40, HIDDEN)
    if not moe._probe_grouped_mm(x):
        pytest.skip("grouped_mm does not run on this device/dtype")
    moe.expert_impl = "grouped_mm"
    grouped = moe(x)
    moe.expert_impl = "loop"
    torch.testing.assert_close(grouped, moe(x), **ROUNDING)


def test_int8_experts_stay_close_to_the_reference():
    moe, weights = random_moe(QWEN2, num_shared_experts=1)
    x = torch.randn(8, HIDDEN)  # decode-sized: the int8 kernels serve it
    expected = reference_moe(moe, weights, x)
    moe.gate.prepare("int8")  # the router ignores int8: routing stays exact
    moe.prepare("int8")
    assert moe._kernels is not None and moe._kernels[0][0].packed_int8 is not None
    torch.testing.assert_close(moe(x), expected, rtol=0.05, atol=0.05)


def test_stacked_loading_equals_per_expert_loading():
    moe, weights = random_moe(MIXTRAL)
    stacked = MoE(HIDDEN, INTER, MIXTRAL)
    stacked.load_gate(weights["gate"])
    stacked.load_stacked_gate_up(weights["w_gate_up"])
    stacked.load_stacked_down(weights["w_down"])
    x = torch.randn(5, HIDDEN)
    assert torch.equal(stacked(x), moe(x))


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")],
        ),
    ],
)
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_bf16_grouped_mm_and_loop_match_the_reference(layer, device):
    """bf16 experts with a float32 router: both expert paths within bf16 rounding of the float32 reference."""
    router, kwargs = LAYERS[layer]
    moe, weights = random_moe(router, dtype=torch.bfloat16, router_dtype=torch.float32, **kwargs)
    moe = moe.to(device)
    x = torch.randn(300, HIDDEN).to(torch.bfloat16)
    # The reference sees the weights and input as bf16 holds them; the router and bias are float32 in both.
    rounded = {name: w if name in ("gate", "bias") else w.bfloat16().float() for name, w in weights.items()}
    expected = reference_moe(moe, rounded, x.float())
    paths = {}
    for impl in ("grouped_mm", "loop"):
        moe.expert_impl = impl
        if impl == "grouped_mm" and not moe._probe_grouped_mm(x.to(device)):
            continue
        paths[impl] = moe(x.to(device)).float().cpu()
        torch.testing.assert_close(paths[impl], expected, rtol=0.03, atol=0.03)
    if device == "cuda":
        assert "grouped_mm" in paths, "grouped_mm should run on CUDA bf16"


# ---- routing == HF ---------------------------------------------------------------------------------------


def _hf_router(module_class, experts: int, **config):
    """An HF router whose weight is the identity, so the hidden states fed to it are its logits exactly."""
    router = module_class(
        SimpleNamespace(hidden_size=experts, num_local_experts=experts, num_experts=experts, **config)
    )
    with torch.no_grad():
        router.weight.copy_(torch.eye(experts))
    return router


def _logits(kind: str, tokens: int, experts: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # a handful of distinct values: most rows have tied experts at the top-k boundary
        return torch.randint(0, 3, (tokens, experts), generator=g).float()
    return torch.randn(tokens, experts, generator=g) * 2


def _hf_and_ours(family: str, experts: int = 16, top_k: int = 4):
    """(HF router module, our RouterConfig) for one family's routing."""
    if family == "mixtral":
        hf = _hf_router(hf_mixtral.MixtralTopKRouter, experts, num_experts_per_tok=top_k)
        return hf, RouterConfig(experts, top_k, norm_topk_prob=True)
    if family in ("qwen2", "qwen2_norm", "qwen3"):
        norm = family != "qwen2"
        module = hf_qwen3.Qwen3MoeTopKRouter if family == "qwen3" else hf_qwen2.Qwen2MoeTopKRouter
        hf = _hf_router(module, experts, num_experts_per_tok=top_k, norm_topk_prob=norm)
        return hf, RouterConfig(experts, top_k, norm_topk_prob=norm)
    if family in ("deepseek_v2_greedy", "deepseek_v2_group"):
        group = family == "deepseek_v2_group"
        hf = _hf_router(
            hf_v2.DeepseekV2TopkRouter,
            experts,
            num_experts_per_tok=top_k,
            routed_scaling_factor=1.5,
            topk_method="group_limited_greedy" if group else "greedy",
            n_group=4 if group else None,
            topk_group=2 if group else None,
        )
        groups = dict(n_group=4, topk_group=2) if group else {}
        return hf, RouterConfig(experts, top_k, routed_scaling_factor=1.5, sorted_topk=False, **groups)
    assert family == "deepseek_v3"
    hf = _hf_router(
        hf_v3.DeepseekV3TopkRouter,
        experts,
        num_experts_per_tok=top_k,
        routed_scaling_factor=2.5,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
    )
    with torch.no_grad():  # coarse values, so corrected scores tie too
        hf.e_score_correction_bias.copy_(torch.randint(-2, 3, (experts,)).float() * 0.25)
    return hf, RouterConfig(
        experts,
        top_k,
        scoring="sigmoid",
        norm_topk_prob=True,
        n_group=4,
        topk_group=2,
        use_correction_bias=True,
        routed_scaling_factor=2.5,
        sorted_topk=False,
    )


FAMILIES = [
    "mixtral",
    "qwen2",
    "qwen2_norm",
    "qwen3",
    "deepseek_v2_greedy",
    "deepseek_v2_group",
    "deepseek_v3",
]


@pytest.mark.parametrize("kind", ["random", "ties"])
@pytest.mark.parametrize("family", FAMILIES)
def test_routing_equals_hf_exactly(family, kind):
    hf, config = _hf_and_ours(family)
    for seed, tokens in enumerate((1, 7, 300)):
        logits = _logits(kind, tokens, config.num_experts, seed)
        with torch.no_grad():
            _, hf_weights, hf_ids = hf(logits)
        bias = getattr(hf, "e_score_correction_bias", None)
        weights, ids = route(logits, config, bias)
        assert weights.dtype == torch.float32 and ids.dtype == torch.int64
        assert torch.equal(ids, hf_ids), f"{family}: different experts"
        assert torch.equal(weights, hf_weights.float()), f"{family}: different weights"


def test_routing_ties_do_occur_at_the_top_k_boundary():
    """Guard: the tie inputs above really put tied experts on both sides of the cut."""
    logits = _logits("ties", 300, 16, 2)
    kth, next_ = logits.sort(dim=-1, descending=True).values[:, 3:5].unbind(-1)
    assert (kth == next_).float().mean() > 0.5


def test_topk_then_softmax_is_softmax_then_renormalised_topk_to_rounding():
    logits = torch.randn(64, 8)
    late, late_ids = route(logits, RouterConfig(8, 2, softmax_before_topk=False))
    early, early_ids = route(logits, MIXTRAL)
    assert torch.equal(late_ids, early_ids)
    torch.testing.assert_close(late, early)


def test_correction_bias_selects_but_does_not_weigh():
    config = RouterConfig(4, 1, scoring="sigmoid", use_correction_bias=True)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    weights, ids = route(logits, config, torch.tensor([0.0, 0.0, 0.0, 10.0]))
    assert ids.tolist() == [[3]]
    torch.testing.assert_close(weights, torch.sigmoid(torch.tensor([[-1.0]])))


# ---- bad configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_experts=8, top_k=2, scoring="relu"), "scoring_func"),
        (dict(num_experts=2, top_k=3), "num_experts_per_tok"),
        (dict(num_experts=8, top_k=0), "num_experts_per_tok"),
        (dict(num_experts=8, top_k=2, n_group=3, topk_group=1), "n_group"),
        (dict(num_experts=8, top_k=2, n_group=4), "topk_group"),
        (dict(num_experts=8, top_k=2, n_group=4, topk_group=5), "topk_group"),
        (dict(num_experts=8, top_k=5, n_group=4, topk_group=2), "num_experts_per_tok"),
        (dict(num_experts=8, top_k=2, routed_scaling_factor=0.0), "routed_scaling_factor"),
    ],
)
def test_bad_router_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RouterConfig(**kwargs)


def test_wrong_expert_weight_shape_is_reported():
    moe = MoE(HIDDEN, INTER, MIXTRAL)
    with pytest.raises(ValueError, match="shape"):
        moe.load_expert_weight(0, "up", torch.zeros(INTER + 1, HIDDEN))
    with pytest.raises(ValueError, match="expert_impl"):
        MoE(HIDDEN, INTER, MIXTRAL, expert_impl="cutlass")


def test_grouped_mm_runs_gated_shared_experts_as_extra_experts():
    """A shared expert of a multiple of moe_intermediate_size, sigmoid-gated, folded into the grouped matmuls:
    same function as the reference, and reloading its weights refreshes the folded copy."""
    if not hasattr(F, "grouped_mm"):
        pytest.skip("torch.nn.functional.grouped_mm is missing from this build")
    kwargs = dict(num_shared_experts=1, shared_intermediate_size=2 * INTER, shared_expert_gate=True)
    moe, weights = random_moe(QWEN2, **kwargs)
    x = torch.randn(37, HIDDEN)
    if not moe._probe_grouped_mm(x):
        pytest.skip("grouped_mm does not run on this device/dtype")
    moe.expert_impl = "grouped_mm"
    torch.testing.assert_close(moe(x), reference_moe(moe, weights, x), **ROUNDING)
    assert moe._fused is not None and moe._fused[1][2] == 2
    weights["shared_down"] = torch.randn_like(weights["shared_down"])
    moe.load_shared("down", weights["shared_down"])
    torch.testing.assert_close(moe(x), reference_moe(moe, weights, x), **ROUNDING)
