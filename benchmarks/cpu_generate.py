"""CPU generation benchmark: longserve (default, exact fp32, int8) vs HF transformers vs llama.cpp, side by side.

Every system runs the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) on the same token ids, greedy, with a
fixed number of new tokens (EOS ignored), on `--threads` CPU threads (2 by default). Each system is measured
in its own fresh subprocess (this script, re-run with `--worker NAME`), so its peak RSS is its own.

Systems: `ours` = longserve as it starts by default (LLM(): the GGUF's own Q4_1/Q8_0 blocks, `gguf`);
`ours-none` = longserve exact fp32 (LLM(quantization="none")); `ours-int8` = longserve with dynamic-int8
matmuls for decode steps of <= 16 rows, exact fp32 otherwise (LLM(quantization="int8")); `hf` = HF
transformers `generate`, fp32; `llamacpp` = llama-cpp-python on the GGUF as it is.

Metrics, per system:
  * single-stream decode tok/s: 128 new tokens after a short prompt, prefill excluded:
    (N - 1) / (T(N) - T(1)), T(k) = wall time of a call producing k tokens from the same prompt.
  * prompt tok/s: a ~500-token prompt, prompt_len / time-to-first-token (median over prompts that differ
    from one another, so no system can reuse a cached prefix).
  * 16-concurrent aggregate output tok/s: 16 requests (prompts of 20..200 tokens) x 128 new tokens.
    longserve: all submitted at once to the engine; HF: one left-padded batch through `generate`;
    llama.cpp: one sequence at a time (llama-cpp-python's `Llama` serves one sequence), run back to back.
  * peak RSS (ru_maxrss of the worker process, model loading included).

Targets (from the spec), evaluated for each longserve variant: 16-concurrent >= 1.5x HF batch-16;
prompt >= 3x llama.cpp; single stream >= 0.6x llama.cpp; peak RSS < 1.5 GB.

Usage:
  python benchmarks/cpu_generate.py [--systems ours,ours-none,ours-int8,hf,llamacpp] [--new-tokens N] [--quick]
                                    [--wait-idle S] [--retries N]
Results: benchmarks/results/cpu_generate-<timestamp>.json and cpu_generate-latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench_util import CONTENTION_WARN, cpu_busy_fraction, default_model, machine_info, wait_for_idle
from _cpu_report import others_share, print_report, summarize
from _cpu_systems import ALL_SYSTEMS, LABELS, build_workload, missing_requirement, run_worker

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"


def spawn(system: str, spec_path: str, args: argparse.Namespace) -> dict:
    why = missing_requirement(system)
    if why:
        return {"system": system, "ok": False, "skipped": why}
    env = dict(os.environ)
    threads = str(args.threads)
    env.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TQDM_DISABLE="1",
    )
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--spec", spec_path]
    cmd += ["--result", result_path]
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)
    t0 = time.perf_counter()
    busy_before = cpu_busy_fraction(1.0)
    load_before = os.getloadavg()[0]
    print(f"[bench] {LABELS[system]}: measuring in a fresh subprocess ...", flush=True)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        rc, log = proc.returncode, (proc.stdout + proc.stderr)
    except subprocess.TimeoutExpired as e:
        rc, log = "timeout", f"timed out after {args.timeout}s\n{e.stdout or ''}{e.stderr or ''}"
    try:
        res = json.loads(Path(result_path).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        res = {}
    finally:
        Path(result_path).unlink(missing_ok=True)
    res.setdefault("system", system)
    res["wall_s"] = time.perf_counter() - t0
    # another busy process on a 2-core machine skews every number: keep the evidence with the result
    res["loadavg_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    res["cpu_busy_before"] = busy_before
    res["returncode"] = rc
    if rc != 0 and "error" not in res:
        tail = log.strip().splitlines()[-1:] or ["no output"]
        res["error"] = f"worker exited {rc}: {tail[0]}"
    if rc != 0 or args.verbose:
        res["log_tail"] = log[-4000:]
    res.setdefault("ok", False)
    status = "ok" if res["ok"] else f"errors ({res.get('error') or 'see table'})"
    la = res["loadavg_1min"]
    print(
        f"[bench] {LABELS[system]}: {status} in {res['wall_s']:.0f}s"
        f" (CPUs {busy_before:.0%} busy before; 1-min load average {la['before']:.1f} -> {la['after']:.1f})",
        flush=True,
    )
    if args.verbose and res.get("log_tail"):
        print(res["log_tail"])
    return res


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--systems", default=",".join(ALL_SYSTEMS), help=f"comma-separated: {','.join(ALL_SYSTEMS)}"
    )
    p.add_argument(
        "--model", default=None, help="GGUF file (default: the packaged SmolLM2-135M-Instruct Q4_1)"
    )
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per request (default 128)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=None, help="concurrent requests (default 16)")
    p.add_argument("--repeats", type=int, default=None, help="single-stream decode repetitions (default 2)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run in a minute or two")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per system")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="S",
        help="before each system, wait up to S seconds until the CPUs are idle (shared machines)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a system again (up to this many times) when other processes took > 10%% of the CPUs",
    )
    p.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/*.json")
    p.add_argument("--verbose", action="store_true", help="print each worker's output")
    p.add_argument("--worker", choices=ALL_SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    args.new_tokens = args.new_tokens or (16 if q else 128)
    args.concurrency = args.concurrency or (4 if q else 16)
    args.short_prompt = 16
    args.long_prompt = 128 if q else 500
    args.conc_prompt_min, args.conc_prompt_max = (20, 60) if q else (20, 200)
    args.prefill_repeats = 2 if q else 3
    args.decode_repeats = args.repeats or (1 if q else 2)
    return args


def save_results(args, workload: dict, summary: dict, results: dict) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    doc = {
        "benchmark": "cpu_generate",
        "timestamp": stamp,
        "argv": sys.argv[1:],
        "machine": machine_info(),
        "config": {
            k: getattr(args, k)
            for k in ("systems", "new_tokens", "threads", "concurrency", "quick", "long_prompt")
        }
        | {"decode_repeats": args.decode_repeats},
        "workload": {
            "model": workload["model"],
            "token_source": workload["token_source"],
            "short_prompt_len": len(workload["short_prompt"]),
            "long_prompt_len": len(workload["long_prompts"][0]),
            "concurrent_prompt_lens": [len(p) for p in workload["concurrent_prompts"]],
        },
        "summary": summary,
        "results": results,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=2)
    path = RESULTS_DIR / f"cpu_generate-{stamp}.json"
    path.write_text(text)
    (RESULTS_DIR / "cpu_generate-latest.json").write_text(text)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.spec, args.result)

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in ALL_SYSTEMS]
    if bad:
        print(f"unknown system(s): {bad}; choose from {ALL_SYSTEMS}", file=sys.stderr)
        return 2
    model_path = Path(args.model) if args.model else default_model()
    if not model_path.is_file():
        print(f"model not found: {model_path}", file=sys.stderr)
        return 2
    workload = build_workload(args, model_path)

    results: dict = {}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(workload, f)
        spec_path = f.name
    try:
        for s in systems:
            for attempt in range(args.retries + 1):
                res = spawn(s, spec_path, args)
                share = others_share(res)
                if share is None or share <= CONTENTION_WARN or attempt == args.retries:
                    break
                print(f"[bench] {LABELS[s]}: other processes took {share:.0%} of the CPUs; measuring again")
            res["attempts"] = attempt + 1
            results[s] = res
    finally:
        Path(spec_path).unlink(missing_ok=True)

    summary = summarize(results, len(workload["concurrent_prompts"]))
    print_report(results, summary, workload, args.threads)
    if not args.no_save:
        path = save_results(args, workload, summary, results)
        print(f"wrote {path.relative_to(HERE.parent)} (and cpu_generate-latest.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
