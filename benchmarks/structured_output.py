"""Constrained-decoding overhead: output tok/s under a JSON schema vs unconstrained, same engine, same run.

    python benchmarks/structured_output.py [--model PATH] [--repeats 3] [--concurrency 1 16]

Each round generates ``concurrency`` requests at once (offline ``LLM.generate``): under the schema (the grammar
ends each answer when its JSON is complete), then unconstrained with ``ignore_eos`` and each request's
``max_tokens`` set to the length its constrained answer had, so both modes run the same batch sizes step for
step (a batch that thins out as answers finish would otherwise count as grammar overhead). Throughput is
output tokens / wall seconds; the table shows median and spread over the repeats. Grammar compile time is
measured per schema on a fresh compiler (first compile, then a cached one), with the tokenizer's one-off
conversion reported apart. Results go to benchmarks/results/structured_output-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
import _bench_util as bu  # noqa: E402

from longserve import LLM, SamplingParams  # noqa: E402
from longserve.engine.sampling_params import StructuredOutputParams  # noqa: E402
from longserve.engine.structured_output import GrammarCompiler  # noqa: E402

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "hobbies", "employed"],
    "additionalProperties": False,
}
SCHEMAS = {
    "person": PERSON,
    "nested": {
        "type": "object",
        "properties": {
            "people": {"type": "array", "items": PERSON, "maxItems": 4},
            "total": {"type": "integer"},
        },
        "required": ["people", "total"],
    },
    "enum_choice": {"enum": ["alpha", "beta", "gamma", "delta"]},
}
PROMPT = "Describe a person as JSON with name, age, city, hobbies and whether they are employed."


def throughput(
    llm: LLM, concurrency: int, max_tokens: int, lengths: list[int] | None = None
) -> tuple[float, list[int]]:
    """Constrained when ``lengths`` is None; otherwise unconstrained, request i generating exactly lengths[i]
    tokens, so both modes run the same batch sizes step for step and differ only by the grammar's work."""
    structure = StructuredOutputParams(json=json.dumps(PERSON))
    params = [
        SamplingParams(temperature=0.7, seed=i, max_tokens=max_tokens, structured_output=structure)
        if lengths is None
        else SamplingParams(temperature=0.7, seed=i, max_tokens=lengths[i], ignore_eos=True)
        for i in range(concurrency)
    ]
    messages = [[{"role": "user", "content": f"{PROMPT} Person {i}."}] for i in range(concurrency)]
    start = time.perf_counter()
    outputs = llm.chat(messages, params)
    elapsed = time.perf_counter() - start
    produced = [len(o.outputs[0].token_ids) for o in outputs]
    if lengths is None:
        for o in outputs:
            if o.outputs[0].finish_reason == "stop":
                json.loads(o.outputs[0].text)  # a benchmark of wrong output would be worthless
    else:
        assert produced == lengths
    return sum(produced) / elapsed, produced


def compile_times(llm: LLM) -> dict:
    compiler = GrammarCompiler(llm.tokenizer, llm.engine.model_config.vocab_size)
    start = time.perf_counter()
    compiler.compile(StructuredOutputParams(regex="a")).result()  # builds the llguidance tokenizer
    out = {"tokenizer_and_first_grammar_ms": (time.perf_counter() - start) * 1e3}
    for name, schema in SCHEMAS.items():
        spec = StructuredOutputParams(json=json.dumps(schema))
        start = time.perf_counter()
        compiler.compile(spec).result()
        first = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        compiler.compile(spec).result()
        out[name] = {"first_ms": first, "cached_ms": (time.perf_counter() - start) * 1e3}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path (default: the SmolLM2 GGUF)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    llm = LLM(args.model)
    _, warm = throughput(llm, 2, 8)  # warm-up: kernels, the llguidance tokenizer, the cached grammar
    throughput(llm, 2, 8, warm)
    rows = []
    for concurrency in args.concurrency:
        runs: dict[str, list[float]] = {"free": [], "json": []}
        for _ in range(args.repeats):
            rate, lengths = throughput(llm, concurrency, args.max_tokens)
            runs["json"].append(rate)
            runs["free"].append(throughput(llm, concurrency, args.max_tokens, lengths)[0])
        free, constrained = statistics.median(runs["free"]), statistics.median(runs["json"])
        rows.append(
            {
                "concurrency": concurrency,
                "unconstrained_tok_s": runs["free"],
                "json_schema_tok_s": runs["json"],
                "overhead_pct_median": 100 * (1 - constrained / free),
            }
        )
    compiles = compile_times(llm)

    table = Table(title=f"constrained decoding overhead ({args.repeats} runs, median [min-max])")
    for column in ("concurrency", "unconstrained tok/s", "json schema tok/s", "overhead"):
        table.add_column(column, justify="right")
    for row in rows:

        def cell(values: list[float]) -> str:
            return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"

        table.add_row(
            str(row["concurrency"]),
            cell(row["unconstrained_tok_s"]),
            cell(row["json_schema_tok_s"]),
            f"{row['overhead_pct_median']:.1f}%",
        )
    console = Console()
    console.print(table)
    console.print({k: v for k, v in compiles.items()})
    result = {"machine": bu.machine_info(), "rows": rows, "compile": compiles, "args": vars(args)}
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"structured_output-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
