"""Sampling one step's rows: longserve's sampler (the one-launch Triton kernel on a GPU, the torch ops
elsewhere or with ``--torch-ops``) against HF transformers' logits warpers + ``torch.multinomial``, on
[batch, vocab] logits shaped like a model's (a few likely tokens over a long tail). Times the whole call,
host and device, until the tokens are on the host; also the host time alone (enqueueing, before the wait).
Prints a table and writes benchmarks/results/sampler_speed.json.

    python benchmarks/sampler_speed.py [--device cuda] [--batches 1,64,256] [--vocab 128256] [--repeats 3]
    python benchmarks/sampler_speed.py --kernel-configs 1024x4,2048x8,4096x8   # GPU: the kernel's tiles
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
SETTINGS = {
    "temp 0.8, top-p 0.95": dict(temperature=0.8, top_p=0.95),
    "temp 1.0, top-k 50": dict(temperature=1.0, top_k=50),
    "temp 0.7, top-k 40, top-p 0.9, min-p 0.05": dict(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05),
}


def model_like_logits(batch: int, vocab: int, device: str) -> torch.Tensor:
    """Rows with a handful of likely tokens over a long tail, as a language model's next-token logits."""
    g = torch.Generator(device="cpu").manual_seed(batch)
    logits = torch.randn(batch, vocab, generator=g) * 2.0  # [batch, vocab]
    peaks = torch.randint(0, vocab, (batch, 8), generator=g)
    logits.scatter_add_(1, peaks, torch.rand(batch, 8, generator=g) * 6 + 8)
    return logits.to(device)


def time_call(fn, device: str, steps: int) -> tuple[float, float]:
    """(ms a call until the result is on the host, ms of host time before the wait), medians."""
    walls, hosts = [], []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        finish = fn()
        hosts.append(time.perf_counter() - start)
        finish()
        walls.append(time.perf_counter() - start)
    return 1e3 * statistics.median(walls), 1e3 * statistics.median(hosts)


def longserve_call(logits: torch.Tensor, setting: dict, torch_ops: bool):
    from longserve.engine.sampler import Sampler
    from longserve.engine.sampling_params import SamplingParams
    from longserve.engine.sequence import Sequence

    params = SamplingParams(max_tokens=16, **setting)
    seqs = [Sequence(f"r{i}", 0, [1], params, frozenset(), 64) for i in range(logits.shape[0])]
    sampler = Sampler(fused_kernel=not torch_ops)

    def call():
        rows = sampler.sample(logits, seqs)
        return rows.to_host

    return call


def hf_call(logits: torch.Tensor, setting: dict):
    import transformers

    warpers = [transformers.TemperatureLogitsWarper(setting["temperature"])]
    if "top_k" in setting:
        warpers.append(transformers.TopKLogitsWarper(setting["top_k"]))
    if "top_p" in setting:
        warpers.append(transformers.TopPLogitsWarper(setting["top_p"]))
    if "min_p" in setting:
        warpers.append(transformers.MinPLogitsWarper(setting["min_p"]))
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long, device=logits.device)

    def call():
        scores = logits
        for warper in warpers:
            scores = warper(ids, scores)
        tokens = torch.multinomial(scores.softmax(dim=-1), 1)
        return tokens.tolist

    return call


def kernel_call(logits: torch.Tensor, setting: dict, block: int, num_warps: int):
    """The GPU kernel alone, with one tile size (``block`` logits a load, ``num_warps`` warps a row)."""
    from longserve.engine.sampling_kernel import fused_sample_rows

    n, vocab = logits.shape
    row = [
        setting["temperature"],
        setting.get("top_k", vocab),
        setting.get("top_p", 1.0),
        setting.get("min_p", 0.0),
        0.0,
        0.0,
    ]  # fmt: skip  (the sampling table's columns; not greedy, not seeded)
    table = torch.tensor([row] * n, dtype=torch.float64, device=logits.device)
    rows = torch.arange(n, device=logits.device)
    uniform = torch.full((n,), float("nan"), dtype=torch.float64, device=logits.device)
    step_seed = torch.tensor([1234], device=logits.device)

    def call():
        tokens, _ = fused_sample_rows(
            logits, table, rows, uniform, step_seed, block=block, num_warps=num_warps
        )
        return tokens.tolist

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--kernel-configs", help="GPU: also the kernel alone at BLOCKxWARPS tiles, e.g. 1024x4"
    )
    args = parser.parse_args(argv)
    configs = (
        [tuple(int(v) for v in c.split("x")) for c in args.kernel_configs.split(",")]
        if args.kernel_configs
        else []
    )
    rows = []
    for name, setting in SETTINGS.items():
        for batch in (int(b) for b in args.batches.split(",")):
            logits = model_like_logits(batch, args.vocab, args.device)
            systems = {
                "longserve": longserve_call(logits, setting, torch_ops=False),
                "hf": hf_call(logits, setting),
            }
            if args.device == "cuda":
                systems["longserve --torch-ops"] = longserve_call(logits, setting, torch_ops=True)
                for block, warps in configs:
                    systems[f"kernel {block}x{warps}"] = kernel_call(logits, setting, block, warps)
            for system, call in systems.items():
                time_call(call, args.device, 3)  # warm-up (the kernel compiles)
                runs = [time_call(call, args.device, args.steps) for _ in range(args.repeats)]
                rows.append(dict(setting=name, batch=batch, system=system, wall_ms=[r[0] for r in runs],
                                 host_ms=[r[1] for r in runs]))  # fmt: skip
    device = (
        torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    )
    print(
        f"sampling one step, vocab {args.vocab}, {device}: ms a call (median of {args.repeats} runs [min-max])"
    )
    print(f"{'setting':<44}{'batch':>6}  {'system':<24}{'wall ms':>9}{'host ms':>9}   runs")
    for row in rows:
        wall, host = row["wall_ms"], row["host_ms"]
        print(f"{row['setting']:<44}{row['batch']:>6}  {row['system']:<24}{statistics.median(wall):>9.3f}"
              f"{statistics.median(host):>9.3f}   [{min(wall):.3f}-{max(wall):.3f}]")  # fmt: skip
    out = ROOT / "results" / "sampler_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"device": device, "vocab": args.vocab, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
