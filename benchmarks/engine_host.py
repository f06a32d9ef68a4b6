"""The engine's host work per sequence per step: scheduling, step inputs, sampling's bookkeeping, reading tokens
back and building deltas, with the forward pass replaced by constant logits so only the host's part is timed.
On a GPU this is what must stay under the device's step time for overlapped steps to hide it (issue 25's
target: 3 µs per sequence at batch 256). Runs on the CPU, on a tiny Llama checkpoint it writes itself; prints
a table and writes benchmarks/results/engine_host.json.

With ``--sampling greedy,sampled`` it also times sampled requests (temperature 0.8, top-p 0.95). The logits
stay one column wide, so the sampling ops cost about what issuing them costs, not their arithmetic.

    python benchmarks/engine_host.py [--batches 64,256] [--contexts 128,4096] [--repeats 3] [--sampling ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))  # tiny_models: the checkpoint writer shared with the tests


def host_us_per_sequence(
    path: str, batch: int, context: int, overlapped: bool, steps: int, sampled: bool = False
) -> float:
    from longserve import LLM, SamplingParams
    from longserve.engine.model_runner import RunnerOutput
    from longserve.engine.protocol import EngineRequest

    # Early sequences decode while later prompts prefill (2 per step at 4K): room for all of it, no preemption.
    new_tokens = 1024 + steps
    blocks = batch * -(-(context + new_tokens + 32) // 16) + 1
    llm = LLM(path, num_kv_blocks=blocks, max_num_seqs=batch, max_num_batched_tokens=max(8192, batch),
              max_model_len=context + new_tokens + 32, async_scheduling=overlapped)  # fmt: skip
    engine, runner = llm.engine, llm.engine.runner
    vocab = engine.model_config.vocab_size  # (the prompts' token ids)

    def no_forward(scheduled, fed=None):  # the inputs are built and uploaded as for a real step
        step, sample_index, _ = runner.describe(scheduled)
        runner.prepare(step, fed)
        # One logit per row: the argmax over a vocabulary is the device's work on a GPU (one launch of host
        # time), so here it must not cost the CPU what it costs over [rows, vocab] (0.45 µs a row at 512).
        return RunnerOutput(torch.zeros(len(sample_index), 1), sample_index, {})

    runner.execute = no_forward
    # As the engine core process does once the model is loaded: the library and model objects leave the
    # collector's view, so a full collection scans only the requests' state.
    gc.collect()
    gc.freeze()
    sampling = dict(temperature=0.8, top_p=0.95) if sampled else dict(temperature=0)
    params = SamplingParams(**sampling, max_tokens=new_tokens, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        engine.add_request(
            EngineRequest(f"h{i}", torch.randint(3, vocab, (context,), generator=g).tolist(), params)
        )
    while any(s.num_computed_tokens < s.num_prompt_tokens for r in engine.requests.values() for s in r.seqs):
        engine.step()
    engine.step()
    assert len(engine.scheduler.running) == batch, "every sequence decodes in every timed step"
    walls = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - start)
    gc.unfreeze()  # (the next run's engine is frozen on its own)
    # The mean, not the median: an occasional full collection is part of what the host costs.
    return 1e6 * statistics.mean(walls) / batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--contexts", default="128,4096")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--sampling", default="greedy", help="greedy and/or sampled (temperature 0.8, top-p 0.95)"
    )
    args = parser.parse_args(argv)
    import tiny_models

    torch.set_num_threads(1)
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        path = tiny_models.write_tiny_model("llama", directory)
        config = Path(path) / "config.json"  # long contexts: more positions (the numbers do not matter here)
        config.write_text(json.dumps(dict(json.loads(config.read_text()), max_position_embeddings=65536)))
        for sampling in args.sampling.split(","):
            for overlapped in (True, False):
                for batch in batches:
                    for context in contexts:
                        runs = [host_us_per_sequence(path, batch, context, overlapped, args.steps,
                                                     sampled=sampling == "sampled")
                                for _ in range(args.repeats)]  # fmt: skip
                        rows.append(dict(sampling=sampling, overlapped=overlapped, batch=batch, context=context,
                                         runs_us=runs, median_us=statistics.median(runs)))  # fmt: skip
    cpu = platform.processor() or platform.machine()
    print(
        f"host µs per sequence per step (mean of {args.steps} steps; [min-max] of {args.repeats} runs); {cpu}"
    )
    print(f"{'sampling':<10}{'steps':<12}{'batch':>7}{'context':>9}{'µs/seq':>10}   runs")
    for row in rows:
        runs = row["runs_us"]
        print(f"{row['sampling']:<10}{'overlapped' if row['overlapped'] else 'sync':<12}{row['batch']:>7}"
              f"{row['context']:>9}{row['median_us']:>10.2f}   [{min(runs):.2f}-{max(runs):.2f}]")  # fmt: skip
    out = ROOT / "results" / "engine_host.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu, "steps": args.steps, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
