"""Tensor and expert parallelism over gloo with 2 CPU processes: every family's logits within 1e-5 (fp32) of
one device and the same greedy tokens; expert parallel equal to one device; clear errors for shapes that do not
split and for a rank that dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from longserve.distributed.launch import RankDiedError
from longserve.distributed.parallel import TensorParallel
from longserve.engine.llm import LLM
from longserve.engine.model_runner import StepDescription
from longserve.engine.sampling_params import SamplingParams

PROMPT = [5, 17, 99, 3, 250, 42, 7, 11, 300, 64, 2, 128, 77, 19, 480, 33, 21]  # 17 tokens: 2 cache blocks
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Rank 0 runs in this process and takes its share of the cores: give the next tests all of them back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def prompt_logits(llm: LLM) -> torch.Tensor:
    """Logits of every prompt position from one prefill through the engine's runner (rank 0 leads)."""
    engine = llm.engine
    size = engine.config.block_size
    blocks = list(range(1, 1 + -(-len(PROMPT) // size)))  # a fresh engine: these blocks hold nothing
    step = StepDescription(
        PROMPT, list(range(len(PROMPT))), list(range(len(PROMPT))), [blocks], [0], [len(PROMPT)], False
    )
    return engine.runner.run(step)  # [tokens, vocab]


def run(model_dir: str, **options) -> tuple[torch.Tensor, list[int]]:
    with LLM(model_dir, kv_cache_memory_mb=4, **options) as llm:
        size = options.get("tensor_parallel_size", 1)
        vocab = llm.engine.model_config.vocab_size
        assert llm.engine.model.embed_tokens.shape[0] == -(-vocab // size)  # this rank's vocabulary rows only
        logits = prompt_logits(llm)
        tokens = llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids
    return logits, tokens


@pytest.mark.parametrize(
    "fixture",
    ["tiny_llama_dir", "tiny_qwen3_dir", "tiny_qwen2_dir", "tiny_mixtral_dir", "tiny_qwen2_moe_dir",
     "tiny_deepseek_v3_dir"],
)  # fmt: skip
def test_tensor_parallel_matches_one_device(fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(fixture)
    single_logits, single_tokens = run(model_dir)
    tp_logits, tp_tokens = run(model_dir, tensor_parallel_size=2)
    torch.testing.assert_close(tp_logits, single_logits, atol=1e-5, rtol=0)
    assert tp_tokens == single_tokens


@pytest.mark.parametrize("fixture", ["tiny_mixtral_dir", "tiny_qwen2_moe_dir", "tiny_deepseek_v3_dir"])
def test_expert_parallel_matches_one_device(fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(fixture)
    single_logits, single_tokens = run(model_dir)
    ep_logits, ep_tokens = run(model_dir, tensor_parallel_size=2, enable_expert_parallel=True)
    torch.testing.assert_close(ep_logits, single_logits, atol=1e-5, rtol=0)
    assert ep_tokens == single_tokens


def test_shapes_that_do_not_split_are_refused(tiny_llama_dir: str) -> None:
    tp = TensorParallel(rank=0, size=3)
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible .* \(3\)"):
        tp.local(4, "num_attention_heads")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        TensorParallel(rank=0, size=4).local_kv_heads(3)
    with pytest.raises(ValueError, match=r"not divisible by the tensor-parallel size \(3\)"):
        LLM(tiny_llama_dir, tensor_parallel_size=3, kv_cache_memory_mb=4)


def test_replicated_kv_heads_when_ranks_outnumber_them() -> None:
    weight = torch.arange(8.0).view(4, 2)  # 2 KV heads of 2 rows each
    parts = [TensorParallel(rank=r, size=4).kv_head_rows(weight, num_kv_heads=2) for r in range(4)]
    assert [p[:, 0].tolist() for p in parts] == [[0, 2], [0, 2], [4, 6], [4, 6]]


def test_a_dead_rank_fails_the_step_instead_of_hanging(tiny_llama_dir: str) -> None:
    with LLM(tiny_llama_dir, tensor_parallel_size=2, kv_cache_memory_mb=4) as llm:
        (follower,) = llm.engine.ranks.followers.processes
        os.kill(follower.pid, signal.SIGKILL)
        follower.wait(timeout=10)
        with pytest.raises(RankDiedError, match="rank-1 exited"):
            llm.generate([PROMPT], GREEDY)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL ranks)")
@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_moe_dir", "tiny_deepseek_v3_dir"])
def test_nccl_tensor_parallel_matches_one_gpu(fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(fixture)
    options = dict(device="cuda", dtype="bfloat16")
    single_logits, single_tokens = run(model_dir, **options)
    tp_logits, tp_tokens = run(model_dir, tensor_parallel_size=2, **options)
    torch.testing.assert_close(tp_logits, single_logits, atol=5e-2, rtol=5e-2)
    assert tp_tokens[:4] == single_tokens[:4]  # bf16 sums in another order may flip a later near-tie


def test_a_script_without_a_main_guard_can_start_ranks(tiny_llama_dir: str, tmp_path) -> None:
    """Followers are fresh interpreters (python -m ...), so the user's script is never re-run in them."""
    script = tmp_path / "plain.py"
    script.write_text(
        "from longserve import LLM, SamplingParams\n"
        f"llm = LLM({tiny_llama_dir!r}, tensor_parallel_size=2, kv_cache_memory_mb=4)\n"
        "out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))\n"
        "print('tokens', len(out[0].outputs[0].token_ids))\n"
        "llm.close()\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tokens 4" in done.stdout
