"""The engine on a GPU (``device="cuda"``): dense and MoBA match the CPU engine, and MoBA's paged decode
(Triton kernels, cached block means) gives what a prefill over the same tokens gives. Skipped without a GPU."""

import pytest
import torch

from longserve import LLM, SamplingParams

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

MOBA = {"attention": "moba", "moba_chunk_size": 16, "moba_topk": 2, "moba_full_layers": 1}
PROMPT_LEN = 90


def _prompt(llm, seed=0):
    vocab = llm.engine.model_config.vocab_size
    return torch.randint(3, vocab, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prompt_logprobs(llm, prompt):
    entries = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0))[0].prompt_logprobs[1:]
    return torch.tensor([e.logprob for e in entries])


# 40-token steps: the prompt's later chunks start inside a cache page and a MoBA block, and read their cached
# prefix through the block tables (the paged prefill kernels).
CHUNKED = {"max_num_batched_tokens": 40, "max_num_seqs": 8}


@pytest.mark.parametrize(
    "options", [{}, MOBA, CHUNKED, MOBA | CHUNKED], ids=["dense", "moba", "dense-chunked", "moba-chunked"]
)
def test_cuda_engine_matches_the_cpu_engine(tiny_llama_dir, options):
    cpu = LLM(tiny_llama_dir, kv_cache_memory_mb=4, **options)
    gpu = LLM(tiny_llama_dir, kv_cache_memory_mb=4, device="cuda", **options)
    assert gpu.engine.runner.caches[0].key.is_cuda
    prompt = _prompt(cpu)
    # float32 everywhere (the Triton kernels too: no tf32)
    torch.testing.assert_close(
        _prompt_logprobs(gpu, prompt), _prompt_logprobs(cpu, prompt), rtol=0, atol=2e-4
    )


@pytest.mark.parametrize("options", [{}, MOBA], ids=["dense", "moba"])
def test_cuda_decode_equals_prefill_of_the_same_tokens(tiny_llama_dir, options):
    """Decode runs the paged split-K kernel (MoBA: over the cached block means); prefill does not."""
    llm = LLM(tiny_llama_dir, kv_cache_memory_mb=4, device="cuda", **options)
    assert (llm.engine.runner.caches[0].gate_keys is not None) == bool(options)
    prompt = _prompt(llm, seed=1)[:37]  # decoding crosses several 16-token block boundaries
    out = llm.generate([prompt], SamplingParams(max_tokens=60, temperature=0.0, logprobs=0, ignore_eos=True))[
        0
    ]
    generated = out.outputs[0]
    decoded = torch.tensor([entry.logprob for entry in generated.logprobs])
    rescored = _prompt_logprobs(llm, prompt + list(generated.token_ids))[len(prompt) - 1 :]
    torch.testing.assert_close(decoded[:-1], rescored[: len(decoded) - 1], rtol=0, atol=2e-4)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"])
def test_cuda_moe_engine_matches_the_cpu_engine(tiny_model_cache, name):
    """MoE families (and MLA) on CUDA run the Triton experts; float32 there too (IEEE products)."""
    directory = tiny_model_cache.path(name)
    cpu = LLM(directory, kv_cache_memory_mb=4)
    gpu = LLM(directory, kv_cache_memory_mb=4, device="cuda")
    moe = next(m for m in gpu.engine.runner.model.modules() if type(m).__name__ == "MoE")
    assert moe._use_triton(torch.zeros(1, moe.hidden_size, device="cuda"))
    prompt = _prompt(cpu)
    torch.testing.assert_close(
        _prompt_logprobs(gpu, prompt), _prompt_logprobs(cpu, prompt), rtol=0, atol=2e-4
    )
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    batch = [prompt[:20], prompt[20:33], prompt[40:47]]
    assert [o.outputs[0].token_ids for o in gpu.generate(batch, params)] == [
        o.outputs[0].token_ids for o in cpu.generate(batch, params)
    ]


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3"])
def test_cuda_moe_engine_in_bfloat16_tracks_float32(tiny_model_cache, name):
    """As served: bf16 weights, Triton experts with tensor-core products. Against the fp32 CPU engine, the
    bf16 GPU engine errs no more than the bf16 CPU engine does. On tiny random DeepSeek-V3 both flip some
    routing choices, with max logprob errors near 1.2 at the same position, so a fixed bound would not test it."""
    directory = tiny_model_cache.path(name)
    cpu = LLM(directory, kv_cache_memory_mb=4)
    cpu16 = LLM(directory, kv_cache_memory_mb=4, dtype="bfloat16")
    gpu = LLM(directory, kv_cache_memory_mb=4, device="cuda", dtype="bfloat16")
    prompt = _prompt(cpu)
    ref, ref16, ours = (_prompt_logprobs(llm, prompt) for llm in (cpu, cpu16, gpu))
    gpu_err, cpu_err = (ours - ref).abs().mean(), (ref16 - ref).abs().mean()
    print(f"{name}: mean |logprob error| vs fp32: gpu bf16 {gpu_err:.4f}, cpu bf16 {cpu_err:.4f}")
    assert gpu_err <= 1.5 * cpu_err + 0.005
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outputs = gpu.generate([prompt[:20], prompt[20:33], prompt[40:47]], params)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outputs)


@pytest.mark.parametrize("chunk", [16, 48])
def test_chunked_prompts_through_the_paged_prefill_kernel_match_one_step(tiny_llama_dir, chunk):
    """Chunks after the first attend their cached prefix through the paged prefill kernel (and prompts that
    share a step go in one launch): the same logprobs and tokens as the whole prompt in one step. In float32:
    the tiny random model's top logits are close enough that bf16 rounding ties some of them."""
    options = dict(kv_cache_memory_mb=16, device="cuda", dtype="float32")
    whole = LLM(tiny_llama_dir, max_num_batched_tokens=1024, **options)
    chunked = LLM(tiny_llama_dir, max_num_batched_tokens=chunk, max_num_seqs=min(chunk, 16), **options)
    prompts = [_prompt(whole, seed) for seed in range(3)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0, logprobs=0)
    for got, want in zip(chunked.generate(prompts, params), whole.generate(prompts, params), strict=True):
        got_lp = torch.tensor([e.logprob for e in got.prompt_logprobs[1:]])
        want_lp = torch.tensor([e.logprob for e in want.prompt_logprobs[1:]])
        torch.testing.assert_close(got_lp, want_lp, rtol=0, atol=1e-3)
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
