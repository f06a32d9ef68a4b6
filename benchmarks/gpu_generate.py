"""GPU decode throughput, side by side in one process: longserve (CUDA graphs, overlapped steps), the same with
synchronous steps, longserve --enforce-eager and HF transformers ``generate`` (bf16, sdpa; with
``--hf-compile`` also HF's static cache under ``torch.compile``), on a Llama-3.2-1B-shaped model with random
weights that this script builds itself. Prints a table and writes JSON to benchmarks/results/.

    python benchmarks/gpu_generate.py                # batch 1, 8, 64, 256; prompt 128 + 128 new tokens
    python benchmarks/gpu_generate.py --tiny         # a small shape, to dry-run the script (CPU too)
    python benchmarks/gpu_generate.py --shape 8b --tensor-parallel-size 1,2,4 --batches 1,64
    python benchmarks/gpu_generate.py --shape moe30b --tensor-parallel-size 1,2 --batches 1,64  # + expert parallel
    python benchmarks/gpu_generate.py --speculative --batches 1,64   # issue 27: speculative decoding

With ``--tensor-parallel-size`` the systems are longserve (graphs) at each size (an MoE shape also with
``--enable-expert-parallel`` at each size above 1), and the table adds each one's speed-up over size 1 from the
same run. With ``--speculative`` the prompts quote themselves (a segment four times) and the systems are
longserve without speculation, with ngram drafts, and with a draft model equal to the target (every draft
holds: the ceiling of the bookkeeping, not a real draft model's speed).

Each (system, batch) runs ``--repeats`` times after a warm-up; the table shows the median, the spread and
every run. Throughput counts generated tokens over the whole ``generate`` call (prefill included), as a user
sees it. The roofline is the weight bytes read per step at the measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))  # tiny_models: the tokenizer writer shared with the tests

LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True,
    rope_theta=500000.0,
)  # fmt: skip
LLAMA_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=False,
    rope_theta=500000.0,
)  # fmt: skip
QWEN3_30B_A3B = dict(
    architecture="Qwen3MoeConfig", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
    num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936, max_position_embeddings=4096,
    tie_word_embeddings=False, rope_theta=1000000.0,
)  # fmt: skip
TINY = dict(LLAMA_1B, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024)  # fmt: skip
TINY_MOE = dict(QWEN3_30B_A3B, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
                num_experts_per_tok=2, vocab_size=1024)  # fmt: skip
SHAPES = {"1b": LLAMA_1B, "8b": LLAMA_8B, "moe30b": QWEN3_30B_A3B, "tiny": TINY, "tiny_moe": TINY_MOE}


def build_checkpoint(shape: dict, device: str, directory: str) -> str:
    import tiny_models
    import transformers

    shape = dict(shape)
    config_class = getattr(transformers, shape.pop("architecture", "LlamaConfig"))
    model_class = (
        transformers.Qwen3MoeForCausalLM
        if config_class.__name__ == "Qwen3MoeConfig"
        else transformers.LlamaForCausalLM
    )
    with torch.device(device):
        model = model_class(config_class(**shape)).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    tiny_models.write_tokenizer(directory, tiny_models.train_tokenizer())
    return directory


def copy_bandwidth(device: str) -> float | None:
    """Device-to-device copy bandwidth, bytes/s (read + write counted), or None on the CPU."""
    if device != "cuda":
        return None
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * 10 * x.numel() / (time.perf_counter() - start)


def run_longserve(path: str, device: str, batches, prompts, new_tokens, repeats, eager, **options) -> dict:
    from longserve import LLM

    # On a GPU the KV cache takes what --gpu-memory-utilization (0.9) leaves. Prefix caching is off: every run
    # repeats the same prompts, which would otherwise come from the cache after the warm-up (HF has none).
    llm = LLM(path, device=device, dtype="bfloat16", max_num_seqs=max(batches), enforce_eager=eager,
              kv_cache_memory_mb=None if device == "cuda" else 512, enable_prefix_caching=False,
              **options)  # fmt: skip
    try:
        return _measure(llm, batches, prompts, new_tokens, repeats, device)
    finally:
        llm.close()  # the other tensor-parallel ranks


def _measure(llm, batches, prompts, new_tokens, repeats, device) -> dict:
    from longserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    out, steps = {}, {}
    gc.collect()  # the checkpoint build's garbage, collected before any timing
    for batch in batches:
        llm.generate(prompts[:batch], params)  # warm-up: allocator, kernels
        out[batch] = [_timed(lambda b=batch: llm.generate(prompts[:b], params), batch * new_tokens, device)
                      for _ in range(repeats)]  # fmt: skip
        steps[batch] = step_times(llm, prompts[:batch], new_tokens, device)
    return {"runs": out, "steps": steps}  # the engine and its KV cache are freed with this frame


def step_times(llm, prompts, new_tokens, device) -> dict:
    """Median wall time of a decode step, and (graphs only) the GPU time of the captured forward's replay:
    their difference is host time the GPU spends idle."""
    from longserve import SamplingParams
    from longserve.engine.protocol import EngineRequest

    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(f"steps-{len(prompts)}-{i}", list(prompt), params))
    start = time.perf_counter()
    while any(s.num_computed_tokens < s.num_prompt_tokens for r in engine.requests.values() for s in r.seqs):
        engine.step()  # prefill
    prefill_s = time.perf_counter() - start
    walls = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - start)
    result = {"step_ms": 1e3 * statistics.median(walls[1:-1] or walls), "prefill_ms": 1e3 * prefill_s}
    graphs = engine.runner.graphs
    bucket = graphs.bucket_for(len(prompts)) if graphs is not None else None
    # A replay on rank 0 alone would wait forever in the graph's all-reduce: one device only.
    if device == "cuda" and bucket in getattr(graphs, "_graphs", {}) and not engine.ranks.tp.is_parallel:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(20):
            graphs._graphs[bucket].replay()
        end.record()
        torch.cuda.synchronize()
        result["graph_gpu_ms"] = begin.elapsed_time(end) / 20
    return result


def run_hf(path: str, device: str, batches, prompts, new_tokens, repeats, compiled: bool = False) -> dict:
    """HF ``generate`` (sdpa); ``compiled``: with a static KV cache and the forward under ``torch.compile``
    (mode reduce-overhead: CUDA graphs), as HF documents for fast generation. Each batch size compiles
    once, in its warm-up."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="sdpa"
    ).to(device)
    if compiled:
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    out = {}
    for batch in batches:
        ids = torch.tensor(prompts[:batch], device=device)  # equal lengths: no padding needed

        def generate(ids=ids):
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip

        generate()
        if compiled:
            generate()  # the first call compiled prefill and decode; the second settles the CUDA graphs
        out[batch] = [_timed(generate, batch * new_tokens, device) for _ in range(repeats)]
    return out


def _free(device: str) -> None:
    """Give the last system's memory back before the next one loads (engines hold reference cycles)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _timed(fn, tokens: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shape, for a dry run")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument(
        "--hf-compile", action="store_true", help="also HF with a static cache and torch.compile (minutes)"
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--layers", type=int, help="fewer decoder layers than the shape has (fits the disk)")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, help="longserve's step budget (default: by device)"
    )
    parser.add_argument(
        "--tensor-parallel-size", help="comma-separated sizes, e.g. 1,2,4: scaling from one run"
    )
    parser.add_argument(
        "--speculative",
        action="store_true",
        help="issue 27: prompts that quote themselves; longserve without speculation, with ngram drafts, and "
        "with a draft model equal to the target (every draft holds: the bookkeeping ceiling)",
    )
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = SHAPES["tiny_moe" if args.tiny and "moe" in args.shape else "tiny" if args.tiny else args.shape]
    if args.layers:
        shape = dict(shape, num_hidden_layers=args.layers)
    tp_sizes = [int(t) for t in args.tensor_parallel_size.split(",")] if args.tensor_parallel_size else []
    batches = [int(b) for b in args.batches.split(",")]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, shape["vocab_size"] - 10, (args.prompt_len,), generator=g).tolist()
               for _ in range(max(batches))]  # fmt: skip
    if args.speculative:  # each prompt a segment four times over: prompt lookup finds what follows
        prompts = [(p[: max(1, args.prompt_len // 4)] * 4)[: args.prompt_len] for p in prompts]
    with tempfile.TemporaryDirectory() as directory:
        path = build_checkpoint(shape, device, directory)
        systems = {}
        runs = [
            ("longserve (graphs)", False, {}),
            ("longserve (graphs, sync)", False, {"async_scheduling": False}),
            ("longserve (eager)", True, {}),
        ]
        if args.speculative:
            ngram = {
                "method": "ngram",
                "num_speculative_tokens": 4,
                "prompt_lookup_min": 2,
                "prompt_lookup_max": 4,
            }
            draft = {"method": "draft_model", "model": path, "num_speculative_tokens": 4,
                     "draft_kv_cache_memory_mb": 4096 if device == "cuda" else 256}  # fmt: skip
            runs = [
                ("longserve (graphs)", False, {}),
                ("longserve ngram", False, {"speculative_config": ngram}),
                ("longserve draft=target", False, {"speculative_config": draft}),
            ]
        if tp_sizes:
            runs = [(f"longserve tp={t}", False, {"tensor_parallel_size": t}) for t in tp_sizes]
            if "num_experts" in shape:
                runs += [(f"longserve tp={t} ep", False, {"tensor_parallel_size": t, "enable_expert_parallel": True})
                         for t in tp_sizes if t > 1]  # fmt: skip
        budget = (
            {"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}
        )
        for name, eager, parallel in runs:
            systems[name] = run_longserve(
                path, device, batches, prompts, args.new_tokens, args.repeats, eager, **parallel, **budget
            )
            _free(device)
        if not args.skip_hf and not tp_sizes:
            systems["transformers generate"] = run_hf(
                path, device, batches, prompts, args.new_tokens, args.repeats
            )
            _free(device)
            if args.hf_compile:
                systems["transformers static + compile"] = run_hf(
                    path, device, batches, prompts, args.new_tokens, args.repeats, compiled=True
                )
                _free(device)
    bandwidth = copy_bandwidth(device)
    hidden, layers, ffn, vocab = (
        shape[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    )
    kv = shape["num_key_value_heads"] * hidden // shape["num_attention_heads"]
    weight_bytes = 2 * (layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * ffn) + vocab * hidden)
    dense = "num_experts" not in shape  # an MoE step reads only the routed experts: no single roofline
    roofline = bandwidth / weight_bytes if bandwidth and dense else None  # bytes/s, reads and writes counted
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; weights {weight_bytes / 1e9:.2f} GB;"
          f" batch-1 roofline {roofline:.0f} tok/s" if roofline else f"device: {device}")  # fmt: skip
    print(f"{'system':<24}" + "".join(f"{'batch ' + str(b):>28}" for b in batches))
    table = {}
    for name, result in systems.items():
        runs, steps = (result["runs"], result["steps"]) if "runs" in result else (result, {})
        cells, table[name] = [], {}
        for b in batches:
            rates = runs[b]
            med = statistics.median(rates)
            table[name][b] = {"median_tok_s": med, "runs_tok_s": rates, "spread": max(rates) - min(rates),
                              **steps.get(b, {})}  # fmt: skip
            cells.append(f"{med:>10.0f} [{min(rates):.0f}-{max(rates):.0f}]")
        print(f"{name:<24}" + "".join(f"{c:>28}" for c in cells))
        base = systems.get(f"longserve tp={tp_sizes[0]}") if tp_sizes else None
        if base is not None and name != f"longserve tp={tp_sizes[0]}":
            speedups = {
                b: table[name][b]["median_tok_s"] / statistics.median(base["runs"][b]) for b in batches
            }
            for b in batches:
                table[name][b][f"speedup_vs_tp{tp_sizes[0]}"] = speedups[b]
            print(
                f"{'  speed-up vs tp=' + str(tp_sizes[0]):<24}"
                + "".join(f"{speedups[b]:>27.2f}x" for b in batches)
            )
        if steps:
            print(
                f"{'  prefill phase ms':<24}" + "".join(f"{steps[b]['prefill_ms']:>28.1f}" for b in batches)
            )
            print(f"{'  decode step ms':<24}" + "".join(
                f"{steps[b]['step_ms']:>18.3f}" + (f" (GPU {steps[b]['graph_gpu_ms']:.3f})"
                                                   if "graph_gpu_ms" in steps[b] else " " * 12)
                for b in batches))  # fmt: skip
    results = ROOT / "results"
    results.mkdir(exist_ok=True)
    suffix = ("_tiny" if args.tiny else "") + (f"_{args.shape}" if args.shape != "1b" else "")
    suffix += f"_tp{args.tensor_parallel_size.replace(',', '-')}" if tp_sizes else ""
    suffix += f"_{args.layers}layers" if args.layers else ""
    suffix += f"_budget{args.max_num_batched_tokens}" if args.max_num_batched_tokens else ""
    out = results / f"gpu_generate{suffix}.json"
    out.write_text(json.dumps({"shape": shape, "device": device, "prompt_len": args.prompt_len,
                               "new_tokens": args.new_tokens, "roofline_tok_s": roofline, "systems": table},
                              indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
