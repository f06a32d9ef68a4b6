"""Long-context time to first token through the engine on one GPU (issue 26): dense and MoBA attention, each with
the default chunked prefill (8,192-token steps on a GPU, what users get) and with the whole prompt in one step, against
HF transformers (sdpa) in one forward. A Llama-3.2-1B-shaped model with random bf16 weights, built for the
longest prompt; one prompt of random token ids, one new token, prefix caching off. Prints a table (median
[min-max] of ``--repeats`` runs after a warm-up) and writes benchmarks/results/long_context-<timestamp>.json.

    python benchmarks/long_context.py                              # 32K and 128K, every system
    python benchmarks/long_context.py --lengths 524288 --repeats 1 --systems dense-1step,moba-1step
    python benchmarks/long_context.py --tiny --lengths 512,1024    # dry run (CPU too)

MoBA systems: ``moba`` is 4096-token blocks, top-12, the last 3 layers dense (the issue's setting);
``moba-small`` is 128-token blocks, top-24, the first block and the last 128 tokens always attended, the last 3
layers dense: the small-block setting whose quality `moba_quality.py` measured (benchmarks/NOTES.md). A
``-all`` suffix makes every layer MoBA: with 3 of 16 layers dense, the dense layers alone cap MoBA's gain at
16/3 = 5.3x however fast the MoBA layers get.
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
sys.path.insert(0, str(ROOT))
from _bench_util import machine_info, print_profile  # noqa: E402
from gpu_generate import SHAPES, build_checkpoint  # noqa: E402

MOBA = {
    "moba": dict(attention="moba", moba_chunk_size=4096, moba_topk=12, moba_full_layers=3),
    "moba-small": dict(
        attention="moba",
        moba_chunk_size=128,
        moba_topk=24,
        moba_full_layers=3,
        moba_sink=True,
        moba_window=128,
    ),
}
SYSTEMS = (
    "dense", "dense-1step", "moba", "moba-1step", "moba-all", "moba-small", "moba-small-1step", "moba-small-all", "hf"
)  # fmt: skip


def engine_options(system: str, length: int, device: str) -> dict:
    """The LLM options of a longserve system for a prompt of ``length`` tokens."""
    one_step = system.endswith("-1step")
    every_layer = system.removesuffix("-1step").endswith("-all")
    options = dict(MOBA.get(system.removesuffix("-1step").removesuffix("-all"), {}))
    if every_layer:
        options["moba_full_layers"] = 0
    if one_step:
        options["max_num_batched_tokens"] = length
    if device != "cuda":  # a dry run: small steps and cache on the CPU
        options.setdefault("max_num_batched_tokens", 256)
        options["kv_cache_memory_mb"] = 256
    return options


def time_longserve(
    path: str,
    system: str,
    prompt: list[int],
    repeats: int,
    device: str,
    warmup_length: int | None = None,
    profile: bool = False,
) -> list[float]:
    from longserve import LLM, SamplingParams

    llm = LLM(path, device=device, dtype="bfloat16", enable_prefix_caching=False, max_num_seqs=1,
              **engine_options(system, len(prompt), device))  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=1)
    try:
        llm.generate([prompt[:warmup_length]], params)  # warm-up: kernels compiled, allocator grown
        times = [_timed(lambda: llm.generate([prompt], params), device) for _ in range(repeats)]
        if profile:
            print_profile(system, lambda: llm.generate([prompt], params), device)
        return times
    finally:
        llm.close()


def time_hf(path: str, prompt: list[int], repeats: int, device: str) -> list[float]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="sdpa"
    ).to(device)
    ids = torch.tensor([prompt], device=device)

    def first_token() -> None:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                       pad_token_id=0)  # fmt: skip

    with torch.inference_mode():
        first_token()
        return [_timed(first_token, device) for _ in range(repeats)]


def _timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="32768,131072", help="prompt lengths, comma-separated")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="small shape, for a dry run")
    parser.add_argument(
        "--warmup-length",
        type=int,
        help="longserve's warm-up prompt: its first N tokens (default: all); long enough that MoBA gates, "
        "short enough that a 1M-token run is not paid twice",
    )
    parser.add_argument("--profile", action="store_true", help="one more run of each system, profiled")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    systems = args.systems.split(",")
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = dict(SHAPES["tiny" if args.tiny else "1b"], max_position_embeddings=max(lengths) + 16)
    if args.tiny:
        MOBA["moba"] = dict(MOBA["moba"], moba_chunk_size=128, moba_topk=2, moba_full_layers=1)
        MOBA["moba-small"] = dict(MOBA["moba-small"], moba_chunk_size=32, moba_topk=4, moba_full_layers=1,
                                  moba_window=32)  # fmt: skip
    runs: dict[str, dict[int, list[float]]] = {s: {} for s in systems}
    with tempfile.TemporaryDirectory() as directory:
        path = build_checkpoint(shape, device, directory)
        _free(device)
        for length in lengths:
            prompt = torch.randint(
                3, shape["vocab_size"], (length,), generator=torch.Generator().manual_seed(0)
            )
            prompt = prompt.tolist()
            for system in systems:
                if system == "hf":
                    runs[system][length] = time_hf(path, prompt, args.repeats, device)
                else:
                    runs[system][length] = time_longserve(
                        path, system, prompt, args.repeats, device, args.warmup_length, args.profile
                    )
                _free(device)
                print(f"{system} {length}: {[round(t, 3) for t in runs[system][length]]}", flush=True)
    print(
        f"\ntime to first token, s: median [min-max] of {args.repeats} ({device}, {'tiny' if args.tiny else '1b'})"
    )
    print(f"{'system':<18}" + "".join(f"{n:>24}" for n in lengths))
    for system in systems:
        cells = []
        for length in lengths:
            t = runs[system][length]
            cells.append(f"{statistics.median(t):.3f} [{min(t):.3f}-{max(t):.3f}]")
        print(f"{system:<18}" + "".join(f"{c:>24}" for c in cells))
    out = ROOT / "results" / f"long_context-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    record = {"machine": machine_info(), "device": device, "shape": "tiny" if args.tiny else "1b",
              "moba": MOBA, "runs": {s: {str(n): t for n, t in r.items()} for s, r in runs.items()}}  # fmt: skip
    if device == "cuda":
        record["gpu"] = torch.cuda.get_device_name()
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
