"""cpu_generate's report: the summary (metrics, ratios, targets per longserve variant) and the printed tables."""

from __future__ import annotations

from pathlib import Path

from _bench_util import CONTENTION_WARN
from _cpu_systems import ALL_SYSTEMS, LABELS, OURS

MEM_TARGET_MB = 1500.0  # "peak memory < 1.5 GB", 1 MB = 10**6 bytes
# metric -> (phase, key in that phase's result)
METRICS = {
    "decode_tok_s": ("single", "decode_tok_s"),
    "prompt_tok_s": ("prefill", "prompt_tok_s"),
    "agg_tok_s": ("concurrent", "agg_tok_s"),
    "peak_rss_mb": (None, "peak_rss_mb"),
}
# metric -> (reference system or None for an absolute threshold, threshold, lower is better, description)
TARGETS = {
    "agg_tok_s": ("hf", 1.5, False, "{n}-concurrent aggregate >= 1.5x HF batch-{n} generate"),
    "prompt_tok_s": ("llamacpp", 3.0, False, "prompt tok/s >= 3x llama.cpp"),
    "decode_tok_s": ("llamacpp", 0.6, False, "single-stream decode >= 0.6x llama.cpp"),
    "peak_rss_mb": (None, MEM_TARGET_MB, True, "peak RSS < 1.5 GB"),
}


def metric(res: dict | None, name: str) -> float | None:
    phase, key = METRICS[name]
    if not res:
        return None
    if phase is None:  # peak RSS: only a system that loaded its model (a failed import says nothing)
        v = res.get(key) if res.get("load_s") is not None else None
    else:
        v = res[phase].get(key) if isinstance(res.get(phase), dict) else None
    return float(v) if isinstance(v, int | float) else None


def summarize(results: dict, nconc: int) -> dict:
    def ratio(a, b):
        return a / b if a is not None and b else None

    out: dict = {"metrics": {}, "ratios": {}, "targets": {}}
    for name in METRICS:
        vals = {s: metric(results.get(s), name) for s in ALL_SYSTEMS}
        out["metrics"][name] = vals
        out["ratios"][name] = {
            f"{o}/{ref}": ratio(vals[o], vals[ref]) for o in OURS for ref in ("llamacpp", "hf")
        }

    for name, (ref, threshold, lower, desc) in TARGETS.items():
        by_variant = {}
        for o in OURS:
            value = out["metrics"][name][o] if ref is None else out["ratios"][name][f"{o}/{ref}"]
            met = None if value is None else (value < threshold if lower else value >= threshold)
            by_variant[o] = {"value": value, "met": met}
        known = {o: v for o, v in by_variant.items() if v["value"] is not None}
        best = None
        if known:
            best = (min if lower else max)(known, key=lambda o: known[o]["value"])
        out["targets"][name] = {
            "description": desc.format(n=nconc),
            "reference": ref,
            "threshold": threshold,
            "lower_is_better": lower,
            "by_variant": by_variant,
            "best_variant": best,
            "met_by": [o for o, v in by_variant.items() if v["met"]],
        }

    # greedy agreement on the single-stream prompt: leading tokens equal to HF's (fp32 reference)
    ref_toks = (results.get("hf") or {}).get("single", {}).get("tokens")
    agree = {}
    for s in (*OURS, "llamacpp"):
        toks = (results.get(s) or {}).get("single", {}).get("tokens")
        if ref_toks and toks:
            pairs = zip(ref_toks, toks, strict=False)
            agree[s] = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(ref_toks), len(toks)))
    out["greedy_prefix_match_vs_hf"] = agree

    out["max_others_cpu_share"] = {s: others_share(results.get(s)) for s in ALL_SYSTEMS}
    return out


def others_share(res: dict | None) -> float | None:
    """Largest share of all CPUs that other processes took during one measured phase of `res`."""
    r = res or {}
    vals = [
        r[ph]["contention"]["others_share"]
        for ph in ("single", "prefill", "concurrent")
        if isinstance(r.get(ph), dict) and "contention" in r[ph]
    ]
    return max(vals) if vals else None


def cell_error(res: dict | None, phase: str | None) -> str:
    """Short text for a table cell that has no number (the full error is printed under the tables)."""
    if res is None:
        return "not run"
    if res.get("skipped"):
        return "skipped"
    p = res.get(phase) if phase else None
    msg = p.get("error") if isinstance(p, dict) else None
    msg = msg or res.get("error")
    if not msg:
        return "n/a"
    msg = msg.splitlines()[0].removeprefix("load failed: ")
    where = "load error" if res.get("load_s") is None else "error"
    return f"{where}: {msg[:45]}"


MARK = {True: "[green]MET[/green]", False: "[red]NOT MET[/red]", None: "[yellow]?[/yellow]"}


def _targets_table(summary: dict):
    from rich.table import Table

    table = Table(title="Targets, for each longserve variant", show_lines=True)
    table.add_column("target", style="bold")
    for o in OURS:
        table.add_column(LABELS[o], justify="right")
    table.add_column("met by", justify="left")
    for t in summary["targets"].values():
        cells = []
        for o in OURS:
            v = t["by_variant"][o]
            if v["value"] is None:
                cells.append(MARK[None])
            elif t["reference"] is None:
                cells.append(f"{v['value']:.0f} MB  {MARK[v['met']]}")
            else:
                cells.append(f"{v['value']:.2f}x  {MARK[v['met']]}")
        met_by = t["met_by"]
        if len(met_by) == len(OURS):
            who = "[green]both[/green]"
        elif met_by:
            who = f"[green]{LABELS[met_by[0]]} only[/green]"
        elif all(t["by_variant"][o]["met"] is False for o in OURS):
            who = "[red]neither[/red]"
        else:
            who = MARK[None]
        table.add_row(t["description"], *cells, who)
    return table


def print_report(results: dict, summary: dict, workload: dict, threads: int) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=max(120, Console().width))
    n = workload["new_tokens"]
    nconc = len(workload["concurrent_prompts"])
    plens = [len(p) for p in workload["concurrent_prompts"]]
    title = f"CPU generate, {threads} threads, {Path(workload['model']).name}, greedy, {n} new tokens"
    table = Table(title=title, show_lines=True)
    table.add_column("metric", style="bold")
    for s in ALL_SYSTEMS:
        table.add_column(LABELS[s], justify="right")

    rows = [
        (
            "decode_tok_s",
            f"single-stream decode tok/s\n({len(workload['short_prompt'])}-tok prompt)",
            "{:.1f}",
        ),
        ("prompt_tok_s", f"prompt tok/s\n({len(workload['long_prompts'][0])}-tok prompt, TTFT)", "{:.0f}"),
        (
            "agg_tok_s",
            f"{nconc}-concurrent aggregate\noutput tok/s (prompts {min(plens)}-{max(plens)})",
            "{:.1f}",
        ),
        ("peak_rss_mb", "peak RSS MB (ru_maxrss)", "{:.0f}"),
    ]
    for key, label, fmt in rows:
        vals = summary["metrics"][key]
        cells = [
            fmt.format(vals[s])
            if vals[s] is not None
            else escape(cell_error(results.get(s), METRICS[key][0]))
            for s in ALL_SYSTEMS
        ]
        table.add_row(label, *cells)
    busy_row = []
    for s in ALL_SYSTEMS:
        v = summary["max_others_cpu_share"][s]
        busy_row.append("-" if v is None else f"[red]{v:.0%}[/red]" if v > CONTENTION_WARN else f"{v:.0%}")
    table.add_row("CPU taken by other processes\n(worst phase; should be ~0%)", *busy_row)

    extra = []
    for o in OURS:
        info = (results.get(o) or {}).get("info") or {}
        if info:
            extra.append(
                f"{LABELS[o]}: dtype {info.get('dtype')}, quantization {info.get('quantization')},"
                f" int8 matmuls {info.get('int8_matmuls')}"
            )
    extra.append("HF transformers: float32 (GGUF dequantized); llama.cpp: the GGUF as it is")
    for s in ALL_SYSTEMS:
        r = results.get(s) or {}
        if r.get("load_s") is not None:
            extra.append(
                f"{LABELS[s]}: load {r['load_s']:.1f}s, RSS after load {r.get('rss_after_load_mb', 0):.0f} MB"
            )
    for s in ALL_SYSTEMS:
        c = (results.get(s) or {}).get("concurrent")
        if isinstance(c, dict) and "mode" in c:
            extra.append(
                f"{LABELS[s]} {nconc}-concurrent: {c['mode']}, {c['output_tokens']} tokens in {c['elapsed_s']:.1f}s"
            )
    for s, k in summary["greedy_prefix_match_vs_hf"].items():
        extra.append(f"greedy tokens equal to HF's: {LABELS[s]} first {k}/{n}")
    for s in ALL_SYSTEMS:
        r = results.get(s) or {}
        if r.get("skipped"):
            extra.append(f"{LABELS[s]} skipped: {r['skipped']}")
        elif r.get("error"):
            extra.append(f"{LABELS[s]} error: {r['error'].splitlines()[0]}")
    extra.append(f"prompt tokens: {workload['token_source']}")
    noisy = [LABELS[s] for s, v in summary["max_others_cpu_share"].items() if v and v > CONTENTION_WARN]
    if noisy:
        extra.append(
            f"WARNING: other processes used the CPUs while measuring {', '.join(noisy)}: those numbers are"
            " low and noisy; re-run on an idle machine (--wait-idle S waits for one)"
        )
    console.print(table)
    console.print(_targets_table(summary))
    for line in extra:
        console.print("  " + line, highlight=False, markup=False)
