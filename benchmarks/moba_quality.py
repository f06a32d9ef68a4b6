"""MoBA quality on the default model: long-text perplexity and passkey retrieval, dense vs MoBA, through the engine.

Every number comes from the real engine path (``LLM``, paged KV cache, chunked prefill, the ``moba`` backend
in the MoBA layers): perplexity from the engine's prompt logprobs, passkeys from greedy chat generation.

  * perplexity: two Python standard-library texts read from the running interpreter, each cut to the model's
    context length in tokens: the source of ``typing.py`` (code) and the Python reference documentation
    topics of ``pydoc_data.topics`` (English prose). Reported over all positions and by position range: below
    topk * chunk every earlier block is chosen, so MoBA equals dense there up to float rounding.
  * passkey: filler sentences with "The pass key is NNNNN. Remember it." inserted at several depths; the chat
    model is asked to repeat the key (greedy). A hit: the key appears in the answer.

Usage:
  python benchmarks/moba_quality.py [--threads 2] [--contexts 2048,4096,8192] [--depths 0.1,0.5,0.9]
                                    [--trials 1] [--chunk 512] [--topk 3] [--controls 0:0,1:0,1:512] [--quick]
                                    [--no-dense]
Results: benchmarks/results/moba_quality-<timestamp>.json and moba_quality-latest.json.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import random
import sys
import time
import typing
from pathlib import Path

from _bench_util import machine_info

from longserve import LLM, SamplingParams

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n\n"
)
QUESTION = "\n\nWhat is the pass key? Answer with the 5-digit number only."
ANSWER_TOKENS = 16


def texts() -> dict[str, str]:
    import pydoc_data.topics

    return {
        "typing.py": Path(inspect.getfile(typing)).read_text(),
        "pydoc_topics": "\n\n".join(pydoc_data.topics.topics.values()),
    }


def configs(args: argparse.Namespace) -> dict[str, dict]:
    moba = dict(attention="moba", moba_chunk_size=args.chunk, moba_topk=args.topk)
    found = {} if args.no_dense else {"dense": {}}
    for full in args.full_layers:
        for sink, window in args.controls:
            name = f"moba c{args.chunk} k{args.topk} full{full}"
            name += " sink" * sink + (f" win{window}" if window else "")
            found[name] = dict(moba, moba_full_layers=full, moba_sink=sink, moba_window=window)
    return found


def perplexity(llm: LLM, token_ids: list[int], ranges: list[tuple[int, int]]) -> dict:
    """exp(mean NLL) of token_ids[1:] from the engine's prompt logprobs, overall and per position range of the
    predicting token."""
    start = time.perf_counter()
    out = llm.generate([token_ids], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    seconds = time.perf_counter() - start
    nll = [-entry.logprob for entry in out.prompt_logprobs[1:]]  # nll[i]: token i + 1 predicted at position i
    result = {"tokens": len(token_ids), "ppl": math.exp(sum(nll) / len(nll)), "seconds": seconds}
    for lo, hi in ranges:
        part = nll[lo:hi]
        if part:
            result[f"ppl[{lo},{min(hi, len(nll))})"] = math.exp(sum(part) / len(part))
    return result


def passkey_prompt(llm: LLM, context: int, depth: float, key: str) -> list[int]:
    """Chat prompt of at most ``context - ANSWER_TOKENS`` tokens with the needle at ``depth`` of the filler."""
    tok = llm.tokenizer
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "

    def build(reps: int) -> list[int]:
        at = round(depth * reps)
        haystack = FILLER * at + needle + FILLER * (reps - at)
        messages = [{"role": "user", "content": INTRO + haystack + QUESTION}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
        return tok.encode(text, add_special_tokens=False)  # the template writes its own special tokens

    per_rep = len(tok.encode(FILLER * 10, add_special_tokens=False)) / 10
    budget = context - ANSWER_TOKENS
    reps = max(1, int((budget - len(build(0))) / per_rep))
    prompt = build(reps)
    while len(prompt) > budget:
        reps -= max(1, (len(prompt) - budget) // int(per_rep) or 1)
        prompt = build(reps)
    return prompt


def passkeys(llm: LLM, trials: list[dict]) -> list[dict]:
    greedy = SamplingParams(temperature=0, max_tokens=ANSWER_TOKENS)
    results = []
    for trial in trials:
        start = time.perf_counter()
        out = llm.generate([trial["prompt"]], greedy)[0].outputs[0]
        answer = out.text.strip()
        results.append(
            {
                "context": trial["context"],
                "depth": trial["depth"],
                "key": trial["key"],
                "prompt_tokens": len(trial["prompt"]),
                "answer": answer,
                "hit": trial["key"] in answer,
                "seconds": time.perf_counter() - start,
            }
        )
        print(f"  passkey ctx {trial['context']:>5} depth {trial['depth']:.0%}: {answer!r}", flush=True)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk", type=int, default=512, help="MoBA chunk size")
    p.add_argument("--topk", type=int, default=3, help="MoBA top-k (own block included)")
    p.add_argument("--full-layers", default="3,0", help="MoBA variants: dense last layers, comma-separated")
    p.add_argument(
        "--controls",
        default="0:0",
        help="MoBA's training-free controls to compare, sink:window pairs, e.g. 0:0,1:0,1:512 (sink on, window "
        "of 512 tokens)",
    )
    p.add_argument("--ppl-tokens", type=int, help="perplexity text length (default: the context length)")
    p.add_argument("--contexts", default="2048,4096,8192", help="passkey prompt lengths in tokens")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths, fractions of the filler")
    p.add_argument("--trials", type=int, default=1, help="passkeys per context and depth")
    p.add_argument("--quick", action="store_true", help="1K perplexity, one 1K passkey context (smoke run)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument(
        "--no-dense", action="store_true", help="MoBA settings only (same seed: the prompts of a dense run)"
    )
    args = p.parse_args(argv)
    args.full_layers = [int(x) for x in args.full_layers.split(",") if x.strip()]
    args.controls = [
        (bool(int(x.split(":")[0])), int(x.split(":")[1])) for x in args.controls.split(",") if x.strip()
    ]
    args.contexts = [int(x) for x in args.contexts.split(",") if x.strip()]
    args.depths = [float(x) for x in args.depths.split(",") if x.strip()]
    if args.quick:
        args.ppl_tokens, args.contexts = 1024, [1024]
    return args


def print_report(doc: dict) -> None:
    names = list(doc["perplexity"])
    print("\nperplexity (engine prompt logprobs)")
    for text, rows in doc["perplexity_by_text"].items():
        keys = [k for k in rows[names[0]] if k.startswith("ppl")]
        print(f"  {text} ({rows[names[0]]['tokens']} tokens)")
        print("    " + f"{'config':<36}" + "".join(f"{k:>18}" for k in keys) + f"{'seconds':>10}")
        for name in names:
            row = rows[name]
            print(
                "    "
                + f"{name:<36}"
                + "".join(f"{row[k]:>18.3f}" for k in keys)
                + f"{row['seconds']:>10.1f}"
            )
    print("\npasskey hits (greedy)")
    contexts = sorted({r["context"] for r in doc["passkey"][names[0]]})
    print("    " + f"{'config':<36}" + "".join(f"{'ctx ' + str(c):>12}" for c in contexts) + f"{'total':>10}")
    for name in names:
        rows = doc["passkey"][name]
        cells = []
        for c in contexts:
            hits = [r["hit"] for r in rows if r["context"] == c]
            cells.append(f"{sum(hits)}/{len(hits)}")
        total = f"{sum(r['hit'] for r in rows)}/{len(rows)}"
        print("    " + f"{name:<36}" + "".join(f"{cell:>12}" for cell in cells) + f"{total:>10}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engine_options = dict(
        num_threads=args.threads,
        kv_cache_memory_mb=512,  # 8K tokens x 30 layers x 3 KV heads x 64 x fp32 x (K, V) = 377 MB
        max_num_batched_tokens=2048,
        max_num_seqs=4,
    )
    doc: dict = {
        "benchmark": "moba_quality",
        "timestamp": time.strftime("%Y%m%d-%H%M%S"),
        "argv": sys.argv[1:],
        "machine": machine_info(),
        "settings": {k: v for k, v in vars(args).items() if k != "no_save"},
        "perplexity": {},
        "passkey": {},
    }
    rng = random.Random(1234)
    trials: list[dict] | None = None
    token_texts: dict[str, list[int]] | None = None
    for name, options in configs(args).items():
        print(f"[{name}] loading", flush=True)
        llm = LLM(**engine_options, **options)
        context = llm.engine.max_model_len
        doc.setdefault("model_context", context)
        if token_texts is None:
            length = min(args.ppl_tokens or context, context) - 1  # one slot for the sampled token
            token_texts = {k: llm.tokenizer.encode(t)[:length] for k, t in texts().items()}
            trials = [
                {"context": c, "depth": d, "key": str(rng.randint(10000, 99999))}
                for c in args.contexts
                for d in args.depths
                for _ in range(args.trials)
            ]
            for trial in trials:
                trial["prompt"] = passkey_prompt(
                    llm, min(trial["context"], context), trial["depth"], trial["key"]
                )
        boundary = args.topk * args.chunk
        ranges = [(0, boundary), (boundary, 4096), (4096, 1 << 30)]
        doc["perplexity"][name] = {}
        for text, ids in token_texts.items():
            row = perplexity(llm, ids, ranges)
            doc["perplexity"][name][text] = row
            print(f"  ppl {text}: {row['ppl']:.3f} ({row['seconds']:.0f} s)", flush=True)
        doc["passkey"][name] = passkeys(llm, trials)
        del llm
        gc.collect()
    doc["perplexity_by_text"] = {
        text: {name: doc["perplexity"][name][text] for name in doc["perplexity"]} for text in token_texts
    }
    print_report(doc)
    if not args.no_save:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        text = json.dumps(doc, indent=2)
        path = RESULTS_DIR / f"moba_quality-{doc['timestamp']}.json"
        path.write_text(text)
        (RESULTS_DIR / "moba_quality-latest.json").write_text(text)
        print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
