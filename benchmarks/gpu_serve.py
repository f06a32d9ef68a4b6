"""Serving against the engine, on one GPU: `longserve serve` + `longserve bench` (streaming completions) at each
concurrency, side by side with the engine offline (`LLM.generate` of the same batch) in the same run, on a
Llama-3.2-1B-shaped model with random bf16 weights (128-token prompts of random token ids, 128 new tokens,
greedy, ``ignore_eos``). The question: how much of what the engine computes reaches users through the API.

    python benchmarks/gpu_serve.py                      # c = 1, 64, 256; api server counts 1 and 2
    python benchmarks/gpu_serve.py --tiny --device cpu  # dry run of the script on a small shape

Each serve phase sends ``c`` requests at concurrency ``c`` (one wave, as the offline batch), ``--repeats``
times after a warm-up, from ``--client-processes`` load-generator processes. The table shows medians, the
spread and every run; TTFT at c=1 is compared with the offline time to a first token (a 1-token generate).
The API server processes' CPU per streamed token is measured from /proc. Results go to
benchmarks/results/gpu_serve-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _serve_systems import role_cpu_s
from gpu_generate import SHAPES, build_checkpoint

from longserve.clients.bench import BenchConfig, run_load

RESULTS = Path(__file__).resolve().parent / "results"


def word_tokenizer(directory: str, vocab_size: int) -> None:
    """Replace the checkpoint's small tokenizer with one that has a word for every id of the model's vocabulary
    (its own tokens keep their ids): random weights pick any id, and each must stream some text, as a real
    model's tokens do, or the API would have nothing to send."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    vocab = json.loads(Path(directory, "tokenizer.json").read_text())["model"]["vocab"]
    vocab = dict(vocab) | {f"w{i}": i for i in range(len(vocab), vocab_size)}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=next(iter(vocab))))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.save(str(Path(directory, "tokenizer.json")))  # decoding joins the words with spaces


def offline(path: str, device: str, prompts, concurrencies, new_tokens: int, repeats: int) -> dict:
    """Engine tok/s for each batch (median of ``repeats`` after a warm-up) and the time to one token at batch 1."""
    import torch

    from longserve import LLM, SamplingParams

    llm = LLM(path, device=device, dtype="bfloat16", max_num_seqs=max(concurrencies),
              kv_cache_memory_mb=16384 if device == "cuda" else 512)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    out: dict = {"tok_s": {}}
    try:
        for batch in concurrencies:
            llm.generate(prompts[:batch], params)
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                llm.generate(prompts[:batch], params)
                runs.append(batch * new_tokens / (time.perf_counter() - start))
            out["tok_s"][batch] = runs
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        firsts = []
        for i in range(7):
            start = time.perf_counter()
            llm.generate([prompts[i]], one)
            firsts.append(time.perf_counter() - start)
        out["first_token_s"] = statistics.median(firsts[2:])
    finally:
        llm.close()
        del llm
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def start_serve(
    path: str, device: str, api_servers: int, max_seqs: int, log: Path
) -> tuple[subprocess.Popen, str]:
    ports = [_free_port() for _ in range(3)]
    command = [sys.executable, "-m", "longserve.cli", "serve", "--model", path, "--device", device,
               "--dtype", "bfloat16", "--port", str(ports[0]), "--controller-port", str(ports[1]),
               "--worker-port", str(ports[2]), "--api-server-count", str(api_servers),
               "--max-num-seqs", str(max_seqs), "--worker-concurrency", str(max_seqs),
               "--kv-cache-memory-mb", "16384" if device == "cuda" else "512"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    deadline = time.monotonic() + 600
    for line in process.stdout:
        if "serving model" in line:
            return process, f"http://127.0.0.1:{ports[0]}/v1"
        if time.monotonic() > deadline:
            break
    process.kill()
    raise RuntimeError(f"serve did not start; see {log}")


def serve_phase(url: str, pid: int, prompts, concurrency: int, new_tokens: int, repeats: int, processes: int):
    runs, ttfts, api_us = [], [], []
    for attempt in range(repeats + 1):  # the first one warms up (tokenizer fetch, graphs of this batch)
        config = BenchConfig(
            base_url=url, num_requests=concurrency, concurrency=concurrency, endpoint="completion",
            max_tokens=new_tokens, ignore_eos=True, prompts=tuple(prompts), processes=processes,
            extra_body={"min_tokens": new_tokens},
        )  # fmt: skip
        before = role_cpu_s(pid)
        summary = asyncio.run(run_load(config)).summary
        after = role_cpu_s(pid)
        if summary.errors:
            raise RuntimeError(f"c={concurrency}: {summary.errors} errors: {summary.error_samples}")
        if attempt:
            runs.append(summary.output_tokens_per_s)
            ttfts.append(summary.ttft.p50)
            api_us.append(1e6 * (after["api"] - before["api"]) / max(summary.output_tokens, 1))
    return {"tok_s": runs, "ttft_p50_s": ttfts, "api_cpu_us_per_token": api_us}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--concurrency", default="1,64,256")
    p.add_argument("--api-server-counts", default="1,2")
    p.add_argument("--client-processes", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    rng = random.Random(0)
    shape = SHAPES["tiny" if args.tiny else "1b"]
    prompts = [[rng.randrange(3, 250) for _ in range(args.prompt_len)] for _ in range(max(concurrencies) + 8)]
    result: dict = {"args": vars(args), "serve": {}}
    with tempfile.TemporaryDirectory() as directory:
        path = build_checkpoint(shape, args.device, directory)
        word_tokenizer(path, shape["vocab_size"])
        result["offline"] = offline(path, args.device, prompts, concurrencies, args.new_tokens, args.repeats)
        for count in (int(c) for c in args.api_server_counts.split(",")):
            log = Path(directory) / f"serve-{count}.log"
            process, url = start_serve(path, args.device, count, max(concurrencies), log)
            try:
                result["serve"][count] = {
                    c: serve_phase(
                        url,
                        process.pid,
                        prompts,
                        c,
                        args.new_tokens,
                        args.repeats,
                        min(args.client_processes, c),
                    )  # fmt: skip
                    for c in concurrencies
                }
            finally:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                result.setdefault("logs", {})[count] = log.read_text()[-3000:]
    _report(result, concurrencies)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"gpu_serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], out.name).write_text(out.read_text())
    print(f"wrote {out}")


def _report(result: dict, concurrencies: list[int]) -> None:
    def cell(runs: list[float]) -> str:
        return f"{statistics.median(runs):8.0f} ({min(runs):.0f}-{max(runs):.0f})"

    first = result["offline"]["first_token_s"] * 1e3
    print(f"offline time to first token (batch 1): {first:.1f} ms")
    print(f"{'c':>4} {'offline tok/s':>22} {'api':>3} {'serve tok/s':>22} {'ratio':>6} {'TTFT p50 ms':>11} "
          f"{'API µs/tok':>10}")  # fmt: skip
    for c in concurrencies:
        engine = result["offline"]["tok_s"][c]
        for count, phases in result["serve"].items():
            served = phases[c]
            ratio = statistics.median(served["tok_s"]) / statistics.median(engine)
            print(f"{c:>4} {cell(engine):>22} {count:>3} {cell(served['tok_s']):>22} {ratio:6.2f} "
                  f"{1e3 * statistics.median([t or float('nan') for t in served['ttft_p50_s']]):11.1f} "
                  f"{statistics.median(served['api_cpu_us_per_token']):10.0f}")  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
