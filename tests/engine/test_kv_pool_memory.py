"""The KV pool is committed at start (memory does not climb by the pool's size as blocks are first used, which
looks like a leak), a pool that cannot fit in the machine's free memory fails at start, saying so, and one
smaller than a sequence of the full context says so at start."""

import ctypes
import ctypes.util
import gc
import logging

import psutil
import pytest

from longserve import LLM
from longserve.engine.model_loading import host_memory_available


def test_the_pool_is_resident_once_the_engine_is_built(tiny_llama_dir):
    # Memory earlier tests freed but the allocator kept resident could hold part of the pool without the RSS
    # growing: hand it back first.
    gc.collect()
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    process = psutil.Process()
    before = process.memory_info().rss
    llm = LLM(tiny_llama_dir, kv_cache_memory_mb=96)
    grown = process.memory_info().rss - before
    assert grown > 90 * 2**20, f"only {grown / 2**20:.0f} MiB resident after building a 96 MiB pool"
    assert llm.engine.cache_capacity > 0


def test_a_pool_larger_than_free_memory_fails_at_start(tiny_llama_dir):
    available = host_memory_available()
    if available is None:
        pytest.skip("no /proc/meminfo here")
    too_big = available // 2**20 * 2
    with pytest.raises(ValueError, match=r"KV cache needs .* MiB .* available: lower --kv-cache-memory-mb"):
        LLM(tiny_llama_dir, kv_cache_memory_mb=too_big)


def test_a_cache_smaller_than_one_full_context_warns_at_start(tiny_llama_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="longserve"):
        llm = LLM(tiny_llama_dir, num_kv_blocks=9)  # 8 blocks of 16 tokens, a 512-token context
    capacity, context = llm.engine.cache_capacity, llm.engine.max_model_len
    assert capacity < context
    assert (
        f"the KV cache holds {capacity} tokens, less than one sequence of the {context}-token" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="longserve"):
        LLM(tiny_llama_dir, kv_cache_memory_mb=64)
    assert "the KV cache holds" not in caplog.text
