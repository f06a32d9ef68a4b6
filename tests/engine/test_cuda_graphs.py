"""CUDA-graph decode: replaying captured forwards gives the tokens eager steps give, for every bucket including
padded batches; models that cannot be captured run eagerly. The GPU tests are skipped without a GPU."""

import pytest
import torch

from longserve import LLM, SamplingParams
from longserve.engine.cuda_graphs import bucket_sizes


def test_buckets_cover_every_batch_up_to_the_largest():
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert bucket_sizes(5) == [1, 2, 4, 5]
    assert bucket_sizes(1) == [1]


def test_the_cpu_engine_has_no_graphs(tiny_llama_dir):
    assert LLM(tiny_llama_dir, kv_cache_memory_mb=4).engine.runner.graphs is None


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _prompts(vocab: int, batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return [torch.randint(3, vocab, (int(5 + 7 * i % 40),), generator=g).tolist() for i in range(batch)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("model", ["llama", "qwen3", "qwen2_moe", "mixtral", "deepseek_v3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_decode_equals_eager_for_every_bucket(tiny_model_cache, model, dtype):
    path = tiny_model_cache.path(model)
    options = dict(kv_cache_memory_mb=64, device="cuda", dtype=dtype, max_num_seqs=24)
    graphs = LLM(path, **options)
    eager = LLM(path, enforce_eager=True, **options)
    assert graphs.engine.runner.graphs is not None and eager.engine.runner.graphs is None
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    vocab = graphs.engine.model_config.vocab_size
    for batch in (1, 3, 5, 17, 24):  # 3, 5 and 17 run padded in the 4, 8 and 24 buckets
        prompts = _prompts(vocab, batch)
        got, want = graphs.generate(prompts, params), eager.generate(prompts, params)
        for g, w in zip(got, want, strict=True):
            g_ids, w_ids = g.outputs[0].token_ids, w.outputs[0].token_ids
            same = next((i for i, (a, b) in enumerate(zip(g_ids, w_ids, strict=True)) if a != b), len(g_ids))
            if dtype == "float32" or batch in bucket_sizes(24):
                assert same == len(g_ids), (batch, model, dtype, same)
            else:
                # bf16 matmuls are not batch-size invariant (cuBLAS picks kernels by row count), so a padded
                # bucket may flip a near-tie late; up to there the two agree.
                assert same >= 8, (batch, model, dtype, same)
            got_lp = torch.tensor([e.logprob for e in g.outputs[0].logprobs[:same]])
            want_lp = torch.tensor([e.logprob for e in w.outputs[0].logprobs[:same]])
            torch.testing.assert_close(got_lp, want_lp, rtol=0, atol=1e-4 if dtype == "float32" else 5e-2)
    assert set(graphs.engine.runner.graphs._graphs) == set(bucket_sizes(24))


@pytest.mark.gpu
@needs_cuda
def test_moba_decode_graphs_give_what_eager_steps_give(tiny_model_cache):
    """MoBA decodes replay graphs: gating, block-sparse reads and the block means of blocks the decodes close
    (16-token blocks: 40 tokens cross two) match eager steps."""
    options = dict(
        kv_cache_memory_mb=16, device="cuda", dtype="float32", attention="moba", moba_chunk_size=16,
        moba_topk=2, moba_full_layers=1, max_num_seqs=8,
    )  # fmt: skip
    path = tiny_model_cache.path("llama")
    graphed, eager = LLM(path, **options), LLM(path, enforce_eager=True, **options)
    assert graphed.engine.runner.graphs is not None and eager.engine.runner.graphs is None
    vocab = eager.engine.model_config.vocab_size
    prompts = _prompts(vocab, 5)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=0)
    for got, want in zip(graphed.generate(prompts, params), eager.generate(prompts, params), strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        got_lp = torch.tensor([e.logprob for e in got.outputs[0].logprobs])
        want_lp = torch.tensor([e.logprob for e in want.outputs[0].logprobs])
        torch.testing.assert_close(got_lp, want_lp, rtol=0, atol=1e-4)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("model", ["llama", "qwen3"])
def test_overlapped_steps_give_what_synchronous_steps_give(tiny_model_cache, model):
    path = tiny_model_cache.path(model)
    options = dict(kv_cache_memory_mb=64, device="cuda", dtype="bfloat16", max_num_seqs=24)
    overlapped, sync = LLM(path, **options), LLM(path, async_scheduling=False, **options)
    assert overlapped.engine.overlap_steps and not sync.engine.overlap_steps
    vocab = sync.engine.model_config.vocab_size
    prompts = _prompts(vocab, 17)  # padded in the 24 bucket
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    for got, want in zip(overlapped.generate(prompts, greedy), sync.generate(prompts, greedy), strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        got_lp = torch.tensor([e.logprob for e in got.outputs[0].logprobs])
        want_lp = torch.tensor([e.logprob for e in want.outputs[0].logprobs])
        torch.testing.assert_close(got_lp, want_lp, rtol=0, atol=1e-3)
    # Seeded sampling reproduces with overlapped steps on, alone or in a batch, and as without them.
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=11, max_tokens=20, ignore_eos=True)
    alone = overlapped.generate(prompts[:1], seeded)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batched = overlapped.generate(prompts[:6], [seeded] + [others] * 5)[0].outputs[0].token_ids
    assert alone == batched == sync.generate(prompts[:1], seeded)[0].outputs[0].token_ids
    # Mixed finishes and a step in flight: EOS-free stop tokens and max_tokens end rows one step early.
    stop = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[alone[3]], ignore_eos=True)
    got = [o.outputs[0].token_ids for o in overlapped.generate(prompts, stop)]
    assert got == [o.outputs[0].token_ids for o in sync.generate(prompts, stop)]
    blocks = overlapped.engine.block_manager
    assert blocks.num_free_blocks == blocks.num_usable_blocks


@pytest.mark.gpu
@needs_cuda
def test_the_kv_cache_takes_what_gpu_memory_utilization_leaves(tiny_llama_dir):
    import gc

    gc.collect()
    torch.cuda.empty_cache()  # earlier tests' cached blocks: the engine gives them back before measuring
    free, total = torch.cuda.mem_get_info()
    share = (total - free) / total + 0.1  # what is in use now, and a tenth of the GPU more
    llm = LLM(tiny_llama_dir, device="cuda", gpu_memory_utilization=share)
    engine = llm.engine
    per_token = (
        2
        * engine.model_config.num_layers
        * engine.model_config.num_kv_heads
        * engine.model_config.head_dim
        * 4
    )
    cached = engine.cache_capacity * per_token
    assert 0.05 * total < cached < 0.1 * total
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="leaves no room for the KV cache"):
        LLM(tiny_llama_dir, device="cuda", gpu_memory_utilization=share)
    del llm, engine
    gc.collect()
    torch.cuda.empty_cache()
