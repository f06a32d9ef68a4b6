"""Perplexity of a GGUF (default: SmolLM2-135M-Instruct Q4_1; ``--model`` another, e.g. a Q4_K_M made by
``llama-quantize``) on a fixed text: llama.cpp's own ``llama-perplexity`` against longserve's exact (fp32,
``--quantization none``) and low-bit paths (the file's blocks with 16-bit activation blocks, ``gguf``, the
default; with 8-bit ones, ``gguf-q8``), same file, same method, in one run. Each should be within 1% of
llama.cpp's.

Method (llama-perplexity's): the text's tokens are cut into windows of ``--ctx`` tokens; each window is scored
over its second half (the first half is context), and perplexity is exp(mean negative log-likelihood) over all
scored tokens. longserve scores through the engine's prompt logprobs; both tokenize the same text with the
file's own tokenizer (llama.cpp's and ours agree on it: the loading tests check ours against transformers').
The text is the source of the running interpreter's ``typing.py``.

    python benchmarks/cpu_perplexity.py [--ctx 512] [--windows 16] [--model FILE.gguf]
Results: benchmarks/results/cpu_perplexity[-<model stem>].json.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import re
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path

import _llama_server
from _bench_util import default_model, machine_info

from longserve import LLM, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"


def ours(model: str, quantization: str | None, ids: list[int], ctx: int, windows: int) -> dict:
    llm = LLM(model, quantization=quantization, max_model_len=ctx + 1, kv_cache_memory_mb=128)
    nll: list[float] = []
    start = time.perf_counter()
    for w in range(windows):
        window = ids[w * ctx : (w + 1) * ctx]
        out = llm.generate([window], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
        # prompt_logprobs[i] is token i's logprob given tokens < i; score the second half, as llama.cpp does.
        nll += [-entry.logprob for entry in out.prompt_logprobs[ctx // 2 :]]
    return {"ppl": math.exp(sum(nll) / len(nll)), "tokens": len(nll), "seconds": time.perf_counter() - start}


def llama_cpp(model: str, text_path: str, ctx: int, windows: int, threads: int) -> dict:
    binary = _llama_server.binary("llama-perplexity")
    cmd = [str(binary), "-m", model, "-f", text_path, "-c", str(ctx), "-b", str(ctx)]
    cmd += ["--chunks", str(windows), "-t", str(threads)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
    if match is None:
        raise RuntimeError(
            f"no final estimate in llama-perplexity's output:\n{(done.stdout + done.stderr)[-2000:]}"
        )
    return {"ppl": float(match.group(1)), "seconds": time.perf_counter() - start}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", help="a GGUF file (default: the default model)")
    args = parser.parse_args()
    model = args.model or str(default_model())
    text = Path(inspect.getfile(typing)).read_text()
    probe = LLM(model, max_model_len=args.ctx, kv_cache_memory_mb=64)
    ids = probe.tokenizer.encode(text)
    del probe
    windows = min(args.windows, len(ids) // args.ctx)
    rows = {}
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write(text)
        f.flush()
        rows["llama.cpp llama-perplexity"] = llama_cpp(model, f.name, args.ctx, windows, args.threads)
    for name, quantization in (("exact (fp32)", "none"), ("--quantization gguf", "gguf"),
                               ("--quantization gguf-q8", "gguf-q8")):  # fmt: skip
        rows[f"longserve {name}"] = ours(model, quantization, ids, args.ctx, windows)
    reference = rows["llama.cpp llama-perplexity"]["ppl"]
    print(
        f"{Path(model).name}: perplexity on typing.py, {windows} windows of {args.ctx} tokens (second halves scored)"
    )
    for name, row in rows.items():
        row["vs_llama_cpp"] = row["ppl"] / reference - 1
        print(f"  {name:<32} {row['ppl']:8.4f}  ({100 * row['vs_llama_cpp']:+.2f}%)  {row['seconds']:.1f} s")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / (
        "cpu_perplexity.json" if args.model is None else f"cpu_perplexity-{Path(model).stem}.json"
    )
    out.write_text(json.dumps(
        {"machine": machine_info(), "model": Path(model).name, "ctx": args.ctx, "windows": windows, "rows": rows},
        indent=2,
    ))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
