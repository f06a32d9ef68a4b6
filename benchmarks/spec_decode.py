"""Speculative decoding on the CPU, side by side: `longserve serve` without speculation, with `ngram` and with
`suffix` drafts, and llama.cpp's C++ `llama-server` without and with its own n-gram speculation, on the
default model (SmolLM2-135M-Instruct Q4_1 GGUF), one stream at a time (c=1), greedy.

Workloads (chat, streamed): `copy` asks for outputs that quote the prompt (edit a given code file, extract a
given document's fields into JSON, summarise a text with verbatim quotes); `free` asks for free writing. Every
request runs to `--max-tokens` (`ignore_eos` and `min_tokens`, which both servers honour), so both servers
produce the same number of tokens. Each round starts every server afresh, so no prompt, output or cache
carries over from an earlier round (the suffix proposer keeps recent outputs: a repeated prompt would be
drafted from its own earlier answer). Decode tok/s is per request (tokens - 1) / (end - first token), summed
over a workload's requests; output tok/s includes the time to the first token. Median and [min-max] over
`--rounds` rounds; the round furthest from the median is named.

Targets (issue 27), copy at c=1: longserve ngram or suffix >= 2x longserve without speculation, and >= 1.2x
llama-server with its n-gram speculation; free writing >= 0.95x without speculation.

    python benchmarks/spec_decode.py [--systems ...] [--rounds 3] [--max-tokens 192] [--threads 2]
    python benchmarks/spec_decode.py --device cuda --systems longserve,longserve-ngram,longserve-suffix \
        --concurrency 64 [--model smol.gguf]   # a GPU: longserve only; batch 64 = 64 requests at once

On a GPU the default model is the same GGUF, dequantized to bf16: a real model whose copies the drafts find
(random-weight models never repeat their prompt, so their drafts all fail). ``throughput`` is all tokens over
the workload's wall time: at c > 1 what the server delivers, at c = 1 about the output tok/s.
Results: benchmarks/results/spec_decode-<timestamp>.json and spec_decode-latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _bench_util import default_model, machine_info
from _serve_systems import start_server

from longserve.clients.bench import BenchConfig, run_load

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
SUFFIX = {"method": "suffix", "num_speculative_tokens": 8}
# system -> (server, extra flags)
SYSTEMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "longserve": ("longserve", ()),
    "longserve-ngram": ("longserve", ("--speculative-config", json.dumps(NGRAM))),
    "longserve-suffix": ("longserve", ("--speculative-config", json.dumps(SUFFIX))),
    # the same with 8-bit activation blocks (llama.cpp's arithmetic; issue 29)
    "longserve-q8": ("longserve", ("--quantization", "gguf-q8")),
    "longserve-q8-ngram": (
        "longserve",
        ("--quantization", "gguf-q8", "--speculative-config", json.dumps(NGRAM)),
    ),
    "llama-server": ("llama-server", ()),
    # llama.cpp's prompt-lookup drafts: as it ships (12-token lookups, drafts up to 48), and with the
    # n-gram and draft sizes of longserve-ngram
    "llama-server-ngram": ("llama-server", ("--spec-type", "ngram-simple")),
    "llama-server-ngram4": (
        "llama-server",
        ("--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "4", "--spec-ngram-simple-size-m", "5"),
    ),
}

CODE = '''def moving_average(values, window):
    """The mean of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    averages = []
    total = 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        if index >= window - 1:
            averages.append(total / window)
    return averages


def normalise(values):
    """Scale values to the range 0..1."""
    low, high = min(values), max(values)
    if high == low:
        return [0.0 for _ in values]
    return [(value - low) / (high - low) for value in values]


def summary(values, window=3):
    smooth = moving_average(values, window)
    return {"count": len(values), "smooth": smooth, "scaled": normalise(smooth)}
'''

DOCUMENT = """From: Maria Gonzales <maria.gonzales@northwind-supplies.com>
To: Accounts Payable <ap@contoso-labs.org>
Date: 14 March 2026
Subject: Invoice NW-20931 for laboratory glassware

Dear Accounts Payable team,

Please find below the details of invoice NW-20931. The order was placed on 2 March 2026 by Dr. Oliver Brandt
(purchase order PO-7781) and shipped from our Rotterdam warehouse on 9 March 2026 by DHL Express, tracking
number 4471 9920 3318. The invoice covers 40 borosilicate beakers of 500 ml at 6.25 EUR each, 25 volumetric
flasks of 250 ml at 11.80 EUR each and 10 burettes of 50 ml at 34.00 EUR each. The net amount is 885.00 EUR,
VAT at 21 percent is 185.85 EUR, and the total due is 1,070.85 EUR. Payment is due within 30 days, by
13 April 2026, to IBAN NL91 ABNA 0417 1643 00 (ABN AMRO, BIC ABNANL2A), quoting the invoice number.

Kind regards,
Maria Gonzales, Northwind Supplies B.V., Havenstraat 12, 3011 Rotterdam, the Netherlands
"""

ARTICLE = """The city council voted on Tuesday to convert the old railway depot into a public library and
community workshop. The building, which has stood empty since 2009, will keep its brick facade and iron
roof. "We wanted a place where people can borrow a book in the morning and repair a bicycle in the afternoon,"
said councillor Amara Osei, who proposed the plan. Construction is expected to begin next spring and to last
eighteen months. The project will cost 14 million euros, of which 9 million come from a national heritage
fund. Residents who attended the meeting were largely supportive. "My grandfather worked in that depot for
thirty years," said Henk de Vries, a retired teacher. "It is good to see it alive again." Some shop owners
on the nearby market square worried about parking, and the council promised a study of traffic before the
design is final. The library will open seven days a week and will host the city's archive of railway
photographs."""

WORKLOADS = {
    "copy": (
        "Here is a Python file:\n\n"
        + CODE
        + "\nRewrite the whole file with the function `normalise` renamed to "
        "`rescale` everywhere. Output only the complete code.",
        "Extract the following fields from this email as JSON: sender name, sender email, invoice number, "
        "purchase order, order date, ship date, carrier, tracking number, items (name, quantity, unit price), "
        "net amount, VAT, total, due date, IBAN. Use the exact text of the email for each value.\n\n"
        + DOCUMENT,
        "Summarise this article in three bullet points, each one quoting a full sentence of the article "
        "verbatim in double quotes.\n\n" + ARTICLE,
    ),
    "free": (
        "Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Explain to a twelve-year-old how a refrigerator keeps food cold.",
        "Write a letter to a friend describing your favourite season and why you love it.",
    ),
}
WARMUP = "Say hello in five different languages."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated: {','.join(SYSTEMS)}")
    p.add_argument("--workloads", default="copy,free")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=192)
    p.add_argument("--threads", type=int, default=2, help="llama-server threads")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="longserve's device")
    p.add_argument("--model", type=Path, help="a GGUF or checkpoint directory (default: the default model)")
    p.add_argument("--concurrency", type=int, default=1, help="requests at once (the prompts cycle)")
    args = p.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = [s for s in args.systems if s not in SYSTEMS] + [
        w for w in args.workloads if w not in WORKLOADS
    ]
    if unknown:
        p.error(f"unknown systems or workloads: {unknown}")
    if args.device == "cuda" and any(SYSTEMS[s][0] != "longserve" for s in args.systems):
        p.error("on a GPU only longserve systems run (llama-server here is the CPU build)")
    return args


def _spec_counts(server) -> dict[str, float]:
    """longserve's spec_decode counters from /metrics (empty for llama-server)."""
    if not server.system.startswith("longserve"):
        return {}
    text = httpx.get(server.base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    pattern = r"^vllm:spec_decode_(num_drafts|num_draft_tokens|num_accepted_tokens)_total\{[^}]*\} (\S+)$"
    return {name: float(value) for name, value in re.findall(pattern, text, re.M)}


def one_round(system: str, args: argparse.Namespace, model: Path, log_dir: Path) -> dict:
    """Start the system afresh, run each workload's prompts one at a time, stop it."""
    server_kind, extra = SYSTEMS[system]
    if args.device == "cuda":
        extra = (*extra, "--device", "cuda")
    server = start_server(
        server_kind, model, args.threads, log_dir, llama_slots=1, llama_context=4096, extra_args=extra
    )
    out: dict = {}
    try:
        body = {"repeat_penalty": 1.0, "min_tokens": args.max_tokens, "ignore_eos": True}
        # Warm at the measured concurrency: the first batch of that size otherwise pays for kernel compiles and
        # graph captures inside the first workload's numbers (c=64 on the H100: 1.2K against 7.9K tok/s).
        c = args.concurrency
        warm = BenchConfig(
            server.base_url, c, c, server.model, max_tokens=32, ignore_eos=True, prompts=(WARMUP,)
        )
        asyncio.run(run_load(warm))
        for workload in args.workloads:
            before = _spec_counts(server)
            prompts = WORKLOADS[workload]
            requests = len(prompts) * -(
                -args.concurrency // len(prompts)
            )  # every prompt, at least c requests
            config = BenchConfig(
                server.base_url, requests, args.concurrency, server.model, max_tokens=args.max_tokens,
                extra_body=body, prompts=prompts,
            )  # fmt: skip
            start = time.perf_counter()
            result = asyncio.run(run_load(config))
            wall = time.perf_counter() - start
            after = _spec_counts(server)
            done = [r for r in result.requests if r.ok]
            if len(done) != len(result.requests):
                raise RuntimeError(f"{system}: failed requests: {result.summary.error_samples}")
            decode_s = sum(r.e2e_s - r.ttft_s for r in done)
            tokens = sum(r.output_tokens for r in done)
            drafted = after.get("num_draft_tokens", 0) - before.get("num_draft_tokens", 0)
            accepted = after.get("num_accepted_tokens", 0) - before.get("num_accepted_tokens", 0)
            out[workload] = {
                "decode_tok_s": sum(r.output_tokens - 1 for r in done) / decode_s,
                "output_tok_s": tokens / sum(r.e2e_s for r in done),
                "throughput_tok_s": tokens / wall,
                "tokens": [r.output_tokens for r in done],
                "ttft_s": [r.ttft_s for r in done],
                "draft_tokens": drafted,
                "acceptance": accepted / drafted if drafted else None,
            }
    finally:
        server.stop()
    return out


def summarise(rounds: list[dict], workload: str, key: str) -> dict:
    values = [r[workload][key] for r in rounds]
    median = statistics.median(values)
    worst = max(range(len(values)), key=lambda i: abs(values[i] - median))
    return {
        "median": median,
        "min": min(values),
        "max": max(values),
        "values": values,
        "furthest_round": worst,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = args.model or default_model()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):  # systems interleaved round by round, so drift hits them alike
            for system in args.systems:
                log_dir = Path(tmp) / f"{system}-{index}"
                log_dir.mkdir()
                print(f"[spec] round {index + 1}: {system} ...", flush=True)
                results.setdefault(system, []).append(one_round(system, args, model, log_dir))
    table = {
        system: {
            w: {k: summarise(rounds, w, k) for k in ("decode_tok_s", "output_tok_s", "throughput_tok_s")}
            | {"acceptance": [r[w]["acceptance"] for r in rounds]}
            for w in args.workloads
        }
        for system, rounds in results.items()
    }
    print_table(table, args)
    if not args.no_save:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        doc = {
            "benchmark": "spec_decode",
            "timestamp": stamp,
            "argv": sys.argv[1:],
            "machine": machine_info(),
            "config": {
                "max_tokens": args.max_tokens,
                "rounds": args.rounds,
                "device": args.device,
                "concurrency": args.concurrency,
                "model": str(model),
                "systems": {s: SYSTEMS[s] for s in args.systems},
            },
            "summary": table,
            "rounds": results,
        }
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        text = json.dumps(doc, indent=2)
        (RESULTS_DIR / f"spec_decode-{stamp}.json").write_text(text)
        (RESULTS_DIR / "spec_decode-latest.json").write_text(text)
    return 0


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def print_table(table: dict, args: argparse.Namespace) -> None:
    info = machine_info()
    print(
        f"\nc={args.concurrency}, {args.max_tokens} tokens per request, {args.rounds} rounds, {args.device}; "
        f"{_gpu_name() if args.device == 'cuda' else info.get('cpu')} {info.get('simd')}"
    )
    print(
        f"{'system':<20} {'workload':<6} {'decode tok/s':>24} {'output tok/s':>24} {'throughput':>24} "
        f"{'acceptance':>11}"
    )
    base = table.get("longserve", {})
    for system, workloads in table.items():
        for workload, row in workloads.items():
            d, o = row["decode_tok_s"], row["output_tok_s"]
            rel = ""
            if system != "longserve" and workload in base:
                rel = f" ({d['median'] / base[workload]['decode_tok_s']['median']:.2f}x)"
            t = row["throughput_tok_s"]
            acc = [a for a in row["acceptance"] if a is not None]
            acceptance = f"{statistics.median(acc):.0%}" if acc else "-"
            print(
                f"{system:<20} {workload:<6} {d['median']:>8.1f} [{d['min']:.1f}-{d['max']:.1f}]{rel:>8} "
                f"{o['median']:>10.1f} [{o['min']:.1f}-{o['max']:.1f}] "
                f"{t['median']:>10.1f} [{t['min']:.1f}-{t['max']:.1f}] {acceptance:>11}"
            )


if __name__ == "__main__":
    sys.exit(main())
