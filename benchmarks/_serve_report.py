"""serve_load's report: ratios and targets at the reference concurrency, and the printed (rich) tables."""

from __future__ import annotations

import sys

from _bench_util import CONTENTION_WARN
from _serve_systems import LABELS
from rich.console import Console
from rich.table import Table

OURS = ("longserve", "longserve-none", "longserve-int8", "longserve-gguf")
LLAMACPP = ("llama-server", "llamacpp", "llamacpp-1t")
ENGINE_OF = {"longserve": "engine", "longserve-int8": "engine-int8"}
VS_LLAMACPP_TARGET = (
    1.5  # output tok/s at the reference concurrency >= 1.5x the better llama.cpp configuration
)
HOP_LOSS_TARGET = 0.05  # API server + worker hop: < 5% output tok/s lost against the engine driven directly


def phase(results: dict, system: str, concurrency: int) -> dict | None:
    for p in (results.get(system) or {}).get("phases") or []:
        if p["concurrency"] == concurrency:
            return p
    return None


def tok_s(results: dict, system: str, concurrency: int) -> float | None:
    p = phase(results, system, concurrency)
    if p is None or p["summary"]["completed"] == 0:
        return None
    return p["summary"]["output_tokens_per_s"]


def summarize(results: dict, ref_conc: int) -> dict:
    """Ratios at ``ref_conc``: ours / the better llama.cpp, the API hop's loss; whether each target is met."""
    llama = {s: tok_s(results, s, ref_conc) for s in LLAMACPP}
    known = {s: v for s, v in llama.items() if v is not None}
    best = max(known, key=known.__getitem__) if known else None
    out: dict = {"reference_concurrency": ref_conc, "llamacpp_tok_s": llama, "llamacpp_best": best}
    out["vs_llamacpp"] = {}
    out["api_hop"] = {}
    for ours in OURS:
        value = tok_s(results, ours, ref_conc)
        ratio = value / known[best] if value is not None and best else None
        out["vs_llamacpp"][ours] = {
            "tok_s": value,
            "ratio": ratio,
            "target": VS_LLAMACPP_TARGET,
            "met": None if ratio is None else ratio >= VS_LLAMACPP_TARGET,
        }
        engine = ENGINE_OF.get(ours)  # the engine-direct twin, for the systems that have one
        direct = tok_s(results, engine, ref_conc) if engine else None
        loss = 1 - value / direct if value is not None and direct else None
        out["api_hop"][ours] = {
            "served_tok_s": value,
            "engine_tok_s": direct,
            "loss": loss,
            "target": HOP_LOSS_TARGET,
            "met": None if loss is None else loss < HOP_LOSS_TARGET,
        }
    out["max_others_cpu_share"] = {
        s: max((p["contention"]["others_share"] for p in r.get("phases") or []), default=None)
        for s, r in results.items()
    }
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _met(flag: bool | None) -> str:
    return {True: "[green]met[/]", False: "[red]not met[/]", None: "-"}[flag]


def print_report(results: dict, summary: dict, config: dict) -> None:
    # wide enough for every column when the output is a file or a pipe (rich assumes 80 columns there)
    console = Console(width=None if sys.stdout.isatty() else 150)
    table = Table(
        title=f"serve_load: {config['max_tokens']} max tokens per request, temperature 0, "
        f"{config['threads']} CPU threads",
        title_justify="left",
    )
    for name, justify in [
        ("system", "left"),
        ("conc", "right"),
        ("ok/req", "right"),
        ("req/s", "right"),
        ("out tok/s", "right"),
        ("tok/req", "right"),
        ("TTFT p50 ms", "right"),
        ("TTFT p99 ms", "right"),
        ("ITL p50 ms", "right"),
        ("ITL p99 ms", "right"),
        ("TPOT ms", "right"),
        ("others CPU", "right"),
    ]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for system, res in results.items():
        label = system
        if not res.get("ok"):
            why = res.get("skipped") or res.get("error") or "failed"
            table.add_row(label, "", f"[yellow]{why.splitlines()[0][:90]}[/]", *[""] * 9)
            continue
        for p in res["phases"]:
            s, share = p["summary"], p["contention"]["others_share"]
            per_req = s["output_tokens"] / s["completed"] if s["completed"] else None
            share_txt = f"{share:.0%}" + (" [red]![/]" if share > CONTENTION_WARN else "")
            ok = f"{s['completed']}/{s['num_requests']}"
            table.add_row(
                label,
                str(s["concurrency"]),
                ok if not s["errors"] else f"[red]{ok}[/]",
                f"{s['requests_per_s']:.2f}",
                f"{s['output_tokens_per_s']:.1f}",
                "-" if per_req is None else f"{per_req:.0f}",
                _ms(s["ttft"]["p50"]),
                _ms(s["ttft"]["p99"]),
                _ms(s["itl"]["p50"]),
                _ms(s["itl"]["p99"]),
                _ms(s["tpot"]["mean"]),
                share_txt,
            )
            label = ""
    console.print(table)
    console.print("; ".join(f"{s} = {LABELS.get(s, s)}" for s in results))
    for system, res in results.items():
        if res.get("ok") and "startup_s" in res:
            rss = res.get("peak_rss_mb")
            rss_txt = f", peak RSS of all its processes {rss:.0f} MiB" if rss is not None else ""
            console.print(f"  {system}: start to ready {res['startup_s']:.2f} s{rss_txt}")

    conc = summary["reference_concurrency"]
    best = summary["llamacpp_best"]
    best_txt = f"{LABELS[best]}, {summary['llamacpp_tok_s'][best]:.1f} tok/s" if best else "not measured"
    console.print(f"At concurrency {conc}; better llama.cpp configuration: {best_txt}")
    for ours in OURS:
        v, h = summary["vs_llamacpp"][ours], summary["api_hop"][ours]
        if v["tok_s"] is None:
            continue
        ratio = "-" if v["ratio"] is None else f"{v['ratio']:.2f}x"
        console.print(
            f"  {LABELS[ours]}: {v['tok_s']:.1f} tok/s = {ratio} llama.cpp "
            f"(target >= {VS_LLAMACPP_TARGET}x: {_met(v['met'])})"
        )
        if h["loss"] is not None:
            console.print(
                f"  {LABELS[ours]} vs {LABELS[ENGINE_OF[ours]]} ({h['engine_tok_s']:.1f} tok/s): "
                f"API hop costs {h['loss']:+.1%} of throughput (target < {HOP_LOSS_TARGET:.0%}: {_met(h['met'])})"
            )
    noisy = [s for s, v in summary["max_others_cpu_share"].items() if v is not None and v > CONTENTION_WARN]
    if noisy:
        console.print(
            f"[red]Other processes took > {CONTENTION_WARN:.0%} of the CPUs while measuring "
            f"{', '.join(noisy)}: those numbers are suspect.[/]"
        )
