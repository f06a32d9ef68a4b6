"""MoBA through the whole engine: per-layer backends, prompt logprobs against dense, chunked prefill, config."""

import pytest
import torch

from longserve import LLM, SamplingParams
from longserve.attention.backend import layer_backends
from longserve.attention.dense import DenseAttention
from longserve.attention.moba import MobaAttention
from longserve.config import EngineConfig

CHUNK, TOPK = 16, 2
PROMPT_LEN = 80  # five blocks: MoBA drops blocks from position TOPK * CHUNK = 32 on
LOGPROBS = SamplingParams(max_tokens=1, prompt_logprobs=0)


def _prompt(llm, seed=0):
    vocab = llm.engine.model_config.vocab_size
    return torch.randint(3, vocab, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prompt_logprobs(llm, prompt):
    entries = llm.generate([prompt], LOGPROBS)[0].prompt_logprobs[1:]
    return torch.tensor([e.logprob for e in entries])  # entry i predicts token i + 1 from position i


def _moba(model_dir, **options):
    options = {"moba_chunk_size": CHUNK, "moba_topk": TOPK, "moba_full_layers": 1, **options}
    return LLM(model_dir, attention="moba", kv_cache_memory_mb=4, **options)


@pytest.fixture(scope="module")
def dense_llama(tiny_llama_dir):
    return LLM(tiny_llama_dir, kv_cache_memory_mb=4)


def test_layer_backends_keep_the_last_layers_dense():
    config = EngineConfig(attention="moba", moba_chunk_size=32, moba_topk=3, moba_full_layers=2)
    backends = layer_backends(config, 5)
    assert [type(b) for b in backends] == [MobaAttention] * 3 + [DenseAttention] * 2
    assert (backends[0].chunk_size, backends[0].topk) == (32, 3)
    assert all(
        isinstance(b, DenseAttention) for b in layer_backends(config, 1)
    )  # more full layers than layers
    assert [b.name for b in layer_backends(EngineConfig(), 3)] == ["dense"] * 3


def test_moba_is_dense_before_topk_blocks_and_sparse_after(tiny_llama_dir, dense_llama):
    moba = _moba(tiny_llama_dir)
    assert [type(layer.self_attn.backend) for layer in moba.engine.model.layers] == [
        MobaAttention,
        DenseAttention,
    ]
    prompt = _prompt(dense_llama)
    dense_lp, moba_lp = _prompt_logprobs(dense_llama, prompt), _prompt_logprobs(moba, prompt)
    boundary = TOPK * CHUNK  # positions below it have at most topk - 1 earlier blocks: all of them are chosen
    torch.testing.assert_close(moba_lp[:boundary], dense_lp[:boundary], rtol=0, atol=1e-5)
    assert (moba_lp[boundary:] - dense_lp[boundary:]).abs().max() > 1e-3
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    out = moba.generate([prompt], greedy)[0].outputs[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


def test_chunked_prefill_and_decode_through_the_engine_equal_one_prefill(tiny_llama_dir):
    whole = _moba(tiny_llama_dir, moba_full_layers=0)
    chunked = _moba(tiny_llama_dir, moba_full_layers=0, max_num_batched_tokens=24, max_num_seqs=4)
    prompt = _prompt(whole, seed=1)
    torch.testing.assert_close(
        _prompt_logprobs(chunked, prompt), _prompt_logprobs(whole, prompt), rtol=0, atol=1e-5
    )
    # Greedy continuation decoded step by step equals its prompt logprobs re-read in one prefill.
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    out = chunked.generate([prompt], greedy)[0].outputs[0]
    again = _prompt_logprobs(whole, prompt + out.token_ids)[PROMPT_LEN - 1 :]
    decoded = torch.tensor([entry.logprob for entry in out.logprobs])
    torch.testing.assert_close(decoded, again[: len(decoded)], rtol=0, atol=1e-4)


def test_moba_equals_dense_when_topk_covers_every_block_or_every_layer_is_full(tiny_llama_dir, dense_llama):
    prompt = _prompt(dense_llama, seed=2)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = dense_llama.generate([prompt], greedy)[0].outputs[0].token_ids
    covering = _moba(tiny_llama_dir, moba_topk=6, moba_full_layers=0)  # 90 tokens: six blocks
    assert covering.generate([prompt], greedy)[0].outputs[0].token_ids == expected
    torch.testing.assert_close(
        _prompt_logprobs(covering, prompt), _prompt_logprobs(dense_llama, prompt), rtol=0, atol=1e-5
    )
    all_full = _moba(tiny_llama_dir, moba_full_layers=2)
    assert torch.equal(_prompt_logprobs(all_full, prompt), _prompt_logprobs(dense_llama, prompt))


def test_moba_runs_deepseek_mla(tiny_deepseek_v2_dir):
    dense = LLM(tiny_deepseek_v2_dir, kv_cache_memory_mb=4)
    moba = _moba(tiny_deepseek_v2_dir, moba_full_layers=0)
    prompt = _prompt(dense, seed=3)
    dense_lp, moba_lp = _prompt_logprobs(dense, prompt), _prompt_logprobs(moba, prompt)
    boundary = TOPK * CHUNK
    torch.testing.assert_close(moba_lp[:boundary], dense_lp[:boundary], rtol=0, atol=1e-5)
    assert (moba_lp[boundary:] - dense_lp[boundary:]).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(moba_chunk_size=24), "chunk_size must be a positive multiple of 16"),
        (dict(moba_topk=0), "topk must be an integer >= 1"),
        (dict(moba_full_layers=-1), "moba_full_layers"),
        (dict(attention="moba", block_size=32, moba_chunk_size=48), "multiple of block_size"),
        (dict(attention="sparse"), "attention must be"),
        (dict(moba_chunk_size=16, moba_topk=2, moba_sink=True, moba_window=20), "raise topk to at least 4"),
    ],
)
def test_bad_moba_settings_fail_before_loading_anything(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**options)
    with pytest.raises(ValueError, match=message):
        LLM("/no/such/model", **options)  # the config fails first: the missing model is never opened


def test_moba_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("LONGSERVE_ATTENTION", "moba")
    monkeypatch.setenv("LONGSERVE_MOBA_CHUNK_SIZE", "512")
    monkeypatch.setenv("LONGSERVE_MOBA_TOPK", "3")
    monkeypatch.setenv("LONGSERVE_MOBA_FULL_LAYERS", "0")
    config = EngineConfig.from_env()
    assert (config.attention, config.moba_chunk_size, config.moba_topk, config.moba_full_layers) == (
        "moba",
        512,
        3,
        0,
    )


def test_sink_and_window_hold_through_chunked_prefill_and_decode(tiny_llama_dir):
    options = dict(moba_full_layers=0, moba_topk=4, moba_sink=True, moba_window=20)
    whole = _moba(tiny_llama_dir, **options)
    chunked = _moba(tiny_llama_dir, max_num_batched_tokens=24, max_num_seqs=4, **options)
    plain = _moba(tiny_llama_dir, moba_full_layers=0, moba_topk=4)
    prompt = _prompt(whole, seed=3)
    want = _prompt_logprobs(whole, prompt)
    torch.testing.assert_close(_prompt_logprobs(chunked, prompt), want, rtol=0, atol=1e-5)
    assert not torch.allclose(_prompt_logprobs(plain, prompt), want, atol=1e-3)  # the options matter
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    out = chunked.generate([prompt], greedy)[0].outputs[0]
    again = _prompt_logprobs(whole, prompt + out.token_ids)[PROMPT_LEN - 1 :]
    decoded = torch.tensor([entry.logprob for entry in out.logprobs])
    torch.testing.assert_close(decoded, again[: len(decoded)], rtol=0, atol=1e-4)
