"""``quantization="gguf"``: a GGUF's own Q4_0/Q4_1/Q8_0 (and Q4_K, Q5_0) projections run low-bit, with 16-bit
activation blocks, and stay close to the exact (fp32) path on the same file (the kernels'
own arithmetic is checked exactly in tests/layers/test_packed_kernels.py); a projection fused from shards of
different formats falls back to the exact values; the low-bit path keeps no float copy of the weights it
serves."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from longserve import LLM, SamplingParams
from longserve.layers.matmul import PreparedMatmul

Q = gguf.GGMLQuantizationType
HIDDEN, FFN = 64, 128  # multiples of 32: every projection's input is whole blocks


def _tensors(k_type, vocab: int) -> dict:
    rng = np.random.default_rng(0)

    def w(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.2).astype(np.float32)

    def norm() -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)

    return {
        "token_embd.weight": (w(vocab, HIDDEN), Q.Q8_0),
        "output_norm.weight": (norm(), Q.F32),
        "blk.0.attn_norm.weight": (norm(), Q.F32),
        "blk.0.ffn_norm.weight": (norm(), Q.F32),
        "blk.0.attn_q.weight": (w(HIDDEN, HIDDEN), Q.Q4_1),
        "blk.0.attn_k.weight": (w(32, HIDDEN), k_type),
        "blk.0.attn_v.weight": (w(32, HIDDEN), Q.Q4_1),
        "blk.0.attn_output.weight": (w(HIDDEN, HIDDEN), Q.Q4_0),
        "blk.0.ffn_gate.weight": (w(FFN, HIDDEN), Q.Q4_1),
        "blk.0.ffn_up.weight": (w(FFN, HIDDEN), Q.Q4_1),
        "blk.0.ffn_down.weight": (w(HIDDEN, FFN), Q.Q4_0),
    }


METADATA = {"llama.embedding_length": HIDDEN, "llama.feed_forward_length": FFN}


def _logprob_gaps(
    path: str, quantization: str = "gguf", kv_cache_dtype: str = "float32"
) -> tuple[LLM, torch.Tensor]:
    """The low-bit engine, and how far its logprobs of the exact path's greedy text (prompt + 12 tokens) are
    from the exact path's own, position by position. The cache stays fp32 unless asked: the matmuls alone."""
    exact = LLM(path, quantization="none")
    greedy = exact.generate(
        "hello 12345 world", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )[0]
    ids = [*greedy.prompt_token_ids, *greedy.outputs[0].token_ids]
    score = SamplingParams(max_tokens=1, prompt_logprobs=0)
    llm = LLM(path, quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    theirs, ours = (engine.generate([ids], score)[0].prompt_logprobs[1:] for engine in (exact, llm))
    return llm, torch.tensor([a.logprob - b.logprob for a, b in zip(ours, theirs, strict=True)]).abs()


def _assert_close_to_exact(gaps: torch.Tensor, bits: int = 16) -> None:
    # Rounding activations to 16-bit blocks moves this 1-layer random model's logprobs by ~1e-4 on average and
    # 3e-4 at most; 8-bit blocks (gguf-q8) by 0.02 and 0.11. A wrong code, scale or tile moves them by nats.
    mean, most = (5e-4, 2e-3) if bits == 16 else (0.06, 0.3)
    assert gaps.mean() < mean and gaps.max() < most, gaps


@pytest.mark.parametrize("k_type", [Q.Q4_0, Q.F32], ids=["all-blocks", "mixed-qkv"])
def test_low_bit_path_stays_close_to_the_exact_path(write_gguf, tiny_tokens, k_type) -> None:
    path = write_gguf(_tensors(k_type, len(tiny_tokens)), metadata=METADATA)
    q8, gaps = _logprob_gaps(path, "gguf-q8")
    _assert_close_to_exact(gaps, bits=8)
    assert q8.engine.model.layers[0].mlp.gate_up_proj.kernel.activation_bits == 8
    llm, gaps = _logprob_gaps(path)
    _assert_close_to_exact(gaps)

    layer = llm.engine.model.layers[0]
    on_blocks = lambda linear: linear.kernel.blocks is not None  # noqa: E731
    assert (
        on_blocks(layer.mlp.gate_up_proj)
        and on_blocks(layer.mlp.down_proj)
        and on_blocks(layer.self_attn.o_proj)
    )
    assert on_blocks(layer.self_attn.qkv_proj) == (k_type != Q.F32)
    # decode attention and rotary ran through the compiled kernels
    assert layer.self_attn.cpu_kernels is not None and layer.self_attn.backend.cpu_kernels is not None
    assert layer.mlp.gate_up_proj.weight is None  # no float copy beside the blocks
    head = llm.engine.model.lm_head_kernel
    assert isinstance(head, PreparedMatmul) and head.blocks is not None and head.weight is None
    assert llm.engine.model.embed_blocks is head.blocks  # tied: lookups read the head's Q8_0 tiles


def test_low_bit_path_caches_fp16_by_default_and_stays_close(write_gguf, tiny_tokens) -> None:
    """auto stores the KV cache in fp16 on the low-bit path (llama.cpp's f16 cache), the exact path in fp32;
    rounding keys and values to fp16 moves this model's logprobs by ~1e-3 (a wrong cache by nats)."""
    path = write_gguf(_tensors(Q.Q4_0, len(tiny_tokens)), metadata=METADATA)
    llm, gaps = _logprob_gaps(path, kv_cache_dtype="auto")
    assert llm.engine.runner.caches[0].key.dtype == torch.float16
    assert gaps.mean() < 2e-3 and gaps.max() < 1e-2, gaps
    assert LLM(path, quantization="none").engine.runner.caches[0].key.dtype == torch.float32


def test_auto_picks_the_low_bit_path_for_block_files_only(write_gguf, tiny_tokens) -> None:
    blocks = LLM(write_gguf(_tensors(Q.Q4_0, len(tiny_tokens)), metadata=METADATA, name="blocks.gguf"))
    assert blocks.engine.quantization == "gguf"
    assert LLM(write_gguf(_tensors(Q.Q4_0, len(tiny_tokens)), metadata=METADATA, name="b.gguf"),
               quantization="none").engine.quantization is None  # fmt: skip
    floats = {name: (array, Q.F32) for name, (array, _) in _tensors(Q.F32, len(tiny_tokens)).items()}
    assert LLM(write_gguf(floats, metadata=METADATA, name="floats.gguf")).engine.quantization is None


def test_k_quant_file_runs_on_its_own_blocks(write_gguf, tiny_tokens) -> None:
    """A Q4_K_M-style file (llama.cpp's mix when rows are not whole 256-weight super-blocks): Q5_0 and Q8_0
    projections, a Q4_K down projection. Every projection runs on blocks and matches the exact path."""
    from kquants import quantize_q4_k

    ffn = 256  # Q4_K rows are whole super-blocks
    rng = np.random.default_rng(1)
    tensors = _tensors(Q.Q5_0, len(tiny_tokens))
    for name, shape, qtype in (("gate", (ffn, HIDDEN), Q.Q5_0), ("up", (ffn, HIDDEN), Q.Q5_0)):
        tensors[f"blk.0.ffn_{name}.weight"] = ((rng.standard_normal(shape) * 0.2).astype(np.float32), qtype)
    down = (rng.standard_normal((HIDDEN, ffn)) * 0.2).astype(np.float32)
    tensors["blk.0.ffn_down.weight"] = (quantize_q4_k(down), Q.Q4_K)
    tensors["blk.0.attn_q.weight"] = (tensors["blk.0.attn_q.weight"][0], Q.Q5_0)
    tensors["blk.0.attn_v.weight"] = (tensors["blk.0.attn_v.weight"][0], Q.Q8_0)
    path = write_gguf(tensors, metadata={**METADATA, "llama.feed_forward_length": ffn})
    llm, gaps = _logprob_gaps(path)
    assert llm.engine.quantization == "gguf"
    _assert_close_to_exact(gaps)
    layer = llm.engine.model.layers[0]
    for linear in (
        layer.self_attn.qkv_proj,
        layer.self_attn.o_proj,
        layer.mlp.gate_up_proj,
        layer.mlp.down_proj,
    ):
        assert linear.kernel.blocks is not None and linear.weight is None
