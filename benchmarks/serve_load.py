"""Serving load benchmark: `longserve serve` vs llama.cpp's OpenAI server, streaming chat under concurrency.

Each server runs the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) in its own subprocess on free loopback
ports; the load generator (`longserve.clients.bench`) sends streaming chat requests at each concurrency
(default 1, 8 and 32, with 8, 16 and 64 requests), temperature 0, `--max-tokens` each (default 128). Prompts are
a fixed list that asks for long answers, so most requests run to max_tokens; the table reports the tokens actually
produced (from `usage` where the server sends it, else one per content chunk), and `--force-length` sends
`min_tokens = max_tokens` (both servers honour it) plus `ignore_eos` (longserve) to make lengths equal.
`repeat_penalty: 1.0` is sent too: llama.cpp's server defaults to 1.1, which changes its greedy output and costs
it time; longserve ignores the field (its default is no penalty).

Systems (see _serve_systems.py): longserve, longserve-int8, llamacpp (as installed, 2 threads per call),
llamacpp-1t (one thread per call, no logits_all: the usual fix for its OpenMP oversubscription), engine / engine-int8 (the same
requests through an in-process engine core (`EngineCoreClient(in_process=True)`) at `--engine-concurrency`, no HTTP: the API hop's cost).

Targets at concurrency 8: longserve output tok/s >= 1.5x the better llama.cpp configuration; the API hop costs
< 5% of the engine's throughput. Each phase records how much CPU other processes took (the server's and the
client's own CPU excluded) and is measured again, up to `--retries` times, when that exceeds 10%.

Usage:
  python benchmarks/serve_load.py [--systems longserve,engine,longserve-int8,engine-int8,llamacpp,llamacpp-1t]
      [--concurrency 1,8,32] [--requests 8,16,64] [--max-tokens 128] [--quick] [--force-length]
      [--wait-idle S] [--retries N]
Results: benchmarks/results/serve_load-<timestamp>.json and serve_load-latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from _bench_util import CONTENTION_WARN, contention, cpu_snapshot, default_model, machine_info, wait_for_idle
from _serve_report import print_report, summarize
from _serve_systems import (
    ALL_SYSTEMS,
    ENGINE_SYSTEMS,
    LABELS,
    discount,
    least_contended,
    missing_requirement,
    peak_rss_mb,
    proc_cpu_s,
    role_cpu_s,
    run_engine_phases,
    spawn_engine,
    start_server,
)

from longserve.clients.bench import BenchConfig, default_prompts, run_load

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
DEFAULT_SYSTEMS = "longserve,engine,longserve-int8,engine-int8,llamacpp,llamacpp-1t"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default=DEFAULT_SYSTEMS, help=f"comma-separated: {','.join(ALL_SYSTEMS)}")
    p.add_argument("--concurrency", default=None, help="comma-separated (default 1,8,32)")
    p.add_argument("--requests", default=None, help="per concurrency, comma-separated (default 8,16,64)")
    p.add_argument("--max-tokens", type=int, default=None, help="per request (default 128)")
    p.add_argument("--engine-concurrency", type=int, default=8, help="concurrency of the engine-direct run")
    p.add_argument("--force-length", action="store_true", help="send min_tokens=max_tokens and ignore_eos")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads per call (as installed)")
    p.add_argument("--quick", action="store_true", help="concurrency 1,8 with 2,8 requests of 32 tokens")
    p.add_argument("--model", type=Path, help="a GGUF file for every system (default: the default model), e.g. a "
                   "Q4_K_M made by llama-quantize")  # fmt: skip
    p.add_argument("--wait-idle", type=float, default=0, metavar="S", help="wait up to S s for idle CPUs")
    p.add_argument("--retries", type=int, default=1, help="re-measure a phase when others took > 10%% CPU")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per engine-direct run")
    p.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/*.json")
    p.add_argument("--worker", choices=ENGINE_SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    args.concurrency = [int(c) for c in (args.concurrency or ("1,8" if q else "1,8,32")).split(",")]
    requests = [int(n) for n in (args.requests or ("2,8" if q else "8,16,64")).split(",")]
    if len(requests) == 1:
        requests *= len(args.concurrency)
    if len(requests) != len(args.concurrency):
        p.error("--requests needs one value, or one per --concurrency value")
    args.requests = requests
    args.max_tokens = args.max_tokens or (32 if q else 128)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in args.systems if s not in ALL_SYSTEMS]
    if bad:
        p.error(f"unknown system(s) {bad}; choose from {list(ALL_SYSTEMS)}")
    return args


def request_extras(args: argparse.Namespace) -> tuple[dict, dict]:
    """(extra HTTP body fields, extra SamplingParams for the engine-direct run)."""
    body: dict = {"repeat_penalty": 1.0}
    engine: dict = {}
    if args.force_length:
        body |= {"min_tokens": args.max_tokens, "ignore_eos": True}
        engine |= {"min_tokens": args.max_tokens, "ignore_eos": True}
    return body, engine


def measure_server(system: str, args: argparse.Namespace, model_path: Path, log_dir: Path) -> dict:
    """Start one server, run every concurrency phase against it, stop it."""
    why = missing_requirement(system)
    if why:
        return {"ok": False, "skipped": why}
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)
    print(f"[bench] {LABELS[system]}: starting ...", flush=True)
    try:
        server = start_server(system, model_path, args.threads, log_dir)
    except RuntimeError as exc:
        return {"ok": False, "error": str(exc)}
    res: dict = {"command": server.command, "env": server.env, "startup_s": server.startup_s, "phases": []}
    body, _ = request_extras(args)
    try:
        for index, (conc, n) in enumerate(zip(args.concurrency, args.requests, strict=True)):
            config = BenchConfig(
                base_url=server.base_url,
                model=server.model,
                num_requests=n,
                concurrency=conc,
                max_tokens=args.max_tokens,
                extra_body=body,
                warmup_requests=1 if index == 0 else 0,  # first-call costs stay out of the numbers
            )
            res["phases"].append(measure_phase(system, config, args, server.proc.pid))
            if server.proc.poll() is not None:
                raise RuntimeError(f"server exited with {server.proc.returncode}")
        res["peak_rss_mb"] = peak_rss_mb(server.proc.pid)
        res["ok"] = True
    except (RuntimeError, OSError) as exc:
        res |= {"ok": False, "error": f"{type(exc).__name__}: {exc}", "log_tail": server.log_tail()}
    finally:
        res["stop"] = server.stop()
    if res["stop"]["how"] != "sigint":
        print(f"[bench] {LABELS[system]}: did not stop on Ctrl-C ({res['stop']})", flush=True)
    return res


def measure_phase(system: str, config: BenchConfig, args: argparse.Namespace, server_pid: int) -> dict:
    """One concurrency level; measured again when other processes took too much of the CPUs meanwhile."""
    attempts = []
    for _ in range(args.retries + 1):
        if args.wait_idle > 0:
            wait_for_idle(args.wait_idle)
        if config.warmup_requests:  # first-call costs (the front end's tokenizer fetch) stay out of the CPU
            warm = replace(config, num_requests=config.warmup_requests, concurrency=1, warmup_requests=0)
            asyncio.run(run_load(replace(warm, max_tokens=min(8, config.max_tokens))))
            config = replace(config, warmup_requests=0)
        before, server_cpu0 = cpu_snapshot(), proc_cpu_s(server_pid)
        roles0 = role_cpu_s(server_pid)
        result = asyncio.run(run_load(config))
        roles1 = role_cpu_s(server_pid)
        cont = contention(before)
        # contention() counts only this process as "own": the server's CPU is ours too, not interference
        cont = discount(cont, cont["own_cpu_s"] + proc_cpu_s(server_pid) - server_cpu0)
        s = result.summary
        # CPU per streamed token by process: for longserve "api" is its API server processes and "server"
        # the controller and worker; llama-server is one process ("server"), so all of it.
        tokens = max(s.output_tokens, 1)
        per_token = {role: 1e6 * (roles1[role] - roles0[role]) / tokens for role in roles0}
        cont["cpu_us_per_token"] = per_token
        cont["front_cpu_ms_per_token"] = (per_token["server"] + per_token["api"] + per_token["other"]) / 1000
        print(
            f"[bench] {LABELS[system]} c={config.concurrency}: {s.completed}/{s.num_requests} ok, "
            f"{s.output_tokens_per_s:.1f} tok/s, others {cont['others_share']:.0%}, CPU per streamed token: "
            f"API server {per_token['api']:.0f} µs, controller+worker (llama-server: all) "
            f"{per_token['server']:.0f} µs, engine core {per_token['core']:.0f} µs",
            flush=True,
        )
        attempts.append(
            {
                "concurrency": config.concurrency,
                "summary": asdict(s),
                "contention": cont,
                "finish_reasons": sorted({str(r.finish_reason) for r in result.requests}),
            }
        )
        if cont["others_share"] <= CONTENTION_WARN:
            break
        if len(attempts) <= args.retries:
            print(f"[bench] other processes took {cont['others_share']:.0%} of the CPUs; measuring again")
    return least_contended(attempts)


def measure_engine(system: str, args: argparse.Namespace) -> dict:
    conc = args.engine_concurrency
    n = dict(zip(args.concurrency, args.requests, strict=True)).get(conc, 2 * conc)
    _, engine_params = request_extras(args)
    spec = {
        "prompts": list(default_prompts()),
        "max_tokens": args.max_tokens,
        "engine_params": engine_params,
        "phases": [{"concurrency": conc, "requests": n}],
        "wait_idle": args.wait_idle,
        "retries": args.retries,
    }
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)
    print(f"[bench] {LABELS[system]}: c={conc}, {n} requests in a fresh subprocess ...", flush=True)
    res = spawn_engine(system, spec, Path(__file__).resolve(), args.timeout)
    for p in res.get("phases", []):
        s = p["summary"]
        print(
            f"[bench] {LABELS[system]} c={conc}: {s['completed']}/{s['num_requests']} ok, "
            f"{s['output_tokens_per_s']:.1f} tok/s, others {p['contention']['others_share']:.0%}"
        )
    return res


def save(args: argparse.Namespace, results: dict, summary: dict, model_path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    body, engine_params = request_extras(args)
    doc = {
        "benchmark": "serve_load",
        "timestamp": stamp,
        "argv": sys.argv[1:],
        "machine": machine_info(),
        "config": {
            "systems": args.systems,
            "concurrency": args.concurrency,
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "engine_concurrency": args.engine_concurrency,
            "threads": args.threads,
            "force_length": args.force_length,
            "quick": args.quick,
        },
        "workload": {
            "model": str(model_path),
            "endpoint": "chat (streaming, stream_options.include_usage)",
            "temperature": 0.0,
            "prompt_chars": [len(p) for p in default_prompts()],
            "extra_body": body,
            "engine_params": engine_params,
        },
        "summary": summary,
        "results": results,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=2)
    path = RESULTS_DIR / f"serve_load-{stamp}.json"
    path.write_text(text)
    (RESULTS_DIR / "serve_load-latest.json").write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:  # engine-direct subprocess
        res = run_engine_phases(args.worker, json.loads(Path(args.spec).read_text()))
        Path(args.result).write_text(json.dumps(res))
        return 0
    model_path = args.model or default_model()
    if not model_path.is_file():
        print(f"model not found: {model_path}", file=sys.stderr)
        return 2
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="serve_load-") as log_dir:
        for system in args.systems:
            t0 = time.perf_counter()
            if system in ENGINE_SYSTEMS:
                results[system] = measure_engine(system, args)
            else:
                results[system] = measure_server(system, args, model_path, Path(log_dir))
            res = results[system]
            status = (
                "ok" if res.get("ok") else (res.get("skipped") or res.get("error", "failed")).splitlines()[0]
            )
            print(f"[bench] {LABELS[system]}: {status} ({time.perf_counter() - t0:.0f}s)", flush=True)
    ref_conc = 8 if 8 in args.concurrency else args.concurrency[len(args.concurrency) // 2]
    summary = summarize(results, ref_conc)
    print_report(results, summary, {"max_tokens": args.max_tokens, "threads": args.threads})
    if not args.no_save:
        path = save(args, results, summary, model_path)
        print(f"wrote {path.relative_to(HERE.parent)} (and serve_load-latest.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
