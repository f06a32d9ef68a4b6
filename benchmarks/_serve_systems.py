"""Serving-benchmark systems: start and stop each server as a subprocess, and the in-process engine workload.

Systems (names used by `--systems`):
  * `longserve` / `longserve-none` / `longserve-int8` / `longserve-gguf`: `longserve serve` (controller + worker +
    API server in one process) on free loopback ports, default model (whose default is `gguf`), optionally
    `--quantization none|int8|gguf`; ready once its banner is printed and
    `/v1/models` lists the model.
  * `longserve-2w` / `longserve-2w-cache`: a controller (dispatch `shortest_queue` / `cache_aware`), two
    workers with half the threads each and an API server, each its own process (`_multi_worker.py`).
  * `llama-server`: llama.cpp's own C++ server (the fair peer: continuous batching over 16 slots), built from the
    llama.cpp in the llama-cpp-python 0.3.36 sdist by `_llama_server.py`; `-t 2 -c 8192 -np 16 -cb`.
  * `llamacpp`: llama-cpp-python's OpenAI server on the same GGUF as installed (`--n_threads 2`).
  * `llamacpp-1t`: the same server with every model call on one thread (`--n_threads 1 --n_threads_batch 1`,
    OMP_NUM_THREADS=1) and `--logits_all False`. The server runs each request's llama.cpp calls on AnyIO worker
    threads, and ggml's OpenMP build gives every calling thread its own team of n_threads busy-waiting threads,
    so teams can oversubscribe the 2 cores, and a 2-thread team stalls whenever anything else takes a core; with
    one thread per call no team is created. `logits_all` (the server's default: True) computes the vocabulary
    projection for every prompt token and keeps every row of logits; nothing here needs them.
    Probes at concurrency 8 (16 requests, prompts as in serve_load), output tok/s:
      idle machine, 128 tokens: as installed 47.5 / 47.6 / 47.7 (one full run: 61.4); 2 threads + no logits_all
      49.2; the same + OMP_WAIT_POLICY=PASSIVE 30.0; 1 thread + no logits_all 45.8.
      a busy neighbour (~1 core), 64 tokens: as installed 27.6 / 27.2; 1 thread 31.2; 1 thread + no logits_all
      34.4; 2 threads + OMP_WAIT_POLICY=PASSIVE 26.9.
    So one thread per call only wins when the machine is shared; both variants are measured and the better one
    is the reference.
  * `engine` / `engine-int8`: the same requests through the engine core process (`EngineCoreClient`, as the
    worker drives it) from a fresh subprocess, no HTTP
    (chat template applied in-process, as the API server does): the API-server hop's cost is the difference.

Both llama.cpp variants run with `--interrupt_requests False`: by default the server ends a running stream as soon
as another request waits for the model, so under concurrency every stream would stop after one chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _llama_server
import httpx
from _bench_util import default_model

SERVER_SYSTEMS = (
    "longserve",
    "longserve-none",
    "longserve-int8",
    "longserve-gguf",
    "longserve-gguf-q8",
    "longserve-nocache",
    "longserve-2w",
    "longserve-2w-cache",
    "llama-server",
    "llamacpp",
    "llamacpp-1t",
)
ENGINE_SYSTEMS = ("engine", "engine-int8")
ALL_SYSTEMS = SERVER_SYSTEMS + ENGINE_SYSTEMS
LABELS = {
    "longserve": "longserve (default: GGUF blocks, 16-bit activations)",
    "longserve-nocache": "longserve --no-enable-prefix-caching",
    "longserve-2w": "longserve, 2 workers, shortest_queue",
    "longserve-2w-cache": "longserve, 2 workers, cache_aware",
    "longserve-none": "longserve exact fp32",
    "longserve-int8": "longserve int8",
    "longserve-gguf": "longserve (GGUF blocks)",
    "longserve-gguf-q8": "longserve gguf-q8 (8-bit activation blocks)",
    "llama-server": "llama.cpp llama-server (C++)",
    "llamacpp": "llama.cpp server (as installed)",
    "llamacpp-1t": "llama.cpp server (1 thread/call, no logits_all)",
    "engine": "engine core direct (default)",
    "engine-int8": "engine core direct int8",
}
STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def missing_requirement(system: str) -> str | None:
    """Why a system cannot run here, or None."""
    if (
        system == "llama-server"
        and shutil.which("cmake") is None
        and _llama_server.binary(build=False) is None
    ):
        return "llama-server is not built and cmake is missing to build it"
    if system.startswith("llamacpp"):
        probe = [sys.executable, "-c", "import llama_cpp.server.app"]
        if subprocess.run(probe, capture_output=True).returncode != 0:
            return "llama_cpp.server is not importable (pip install sse-starlette starlette-context pydantic-settings)"
    if system.startswith("longserve"):
        src = Path(__file__).resolve().parent.parent / "src" / "longserve" / "serve"
        missing = [n for n in ("api_server.py", "worker.py", "controller.py") if not (src / n).is_file()]
        if missing:
            return f"serving stack not there yet: {', '.join(missing)} missing"
    return None


def proc_cpu_s(pid: int, descendants: bool = True) -> float:
    """CPU seconds (user + system, all threads and reaped children) of a live process and, unless told not
    to, of its live descendants (longserve's engine core runs in a child process), from /proc/<pid>/stat."""
    stats = _proc_stats()
    if pid not in stats:
        return float("nan")
    if not descendants:
        return stats[pid][1] / os.sysconf("SC_CLK_TCK")
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _) in stats.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(stats[p][1] for p in tree) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a server: the sum of VmHWM (each process's own peak) over the process and its
    live descendants, in MiB. An upper bound of their joint peak: the processes need not peak together."""
    stats = _proc_stats()
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _) in stats.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    total_kb = 0
    for member in tree:
        try:
            with open(f"/proc/{member}/status") as f:
                total_kb += next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
        except OSError:
            continue
    return total_kb / 1024


def role_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of a server and its live children by role: "server" (the process itself; for longserve the
    controller and the worker), "api" (longserve's API server processes), "core" (its engine core) and
    "other" children."""
    stats = _proc_stats()
    tick = os.sysconf("SC_CLK_TCK")
    roles = {"server": stats.get(pid, (0, 0))[1] / tick, "api": 0.0, "core": 0.0, "other": 0.0}
    for child, (ppid, jiffies) in stats.items():
        if ppid != pid:
            continue
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        role = "core" if "core_process" in command else "api" if "api_processes" in command else "other"
        roles[role] += proc_cpu_s(child) if role == "core" else jiffies / tick
    return roles


def discount(cont: dict, cpu_s: float) -> dict:
    """``contention()`` counts only this process as its own: take the system under test's CPU out of
    "others" too (a server process and its children, or this process's engine core child)."""
    if math.isnan(cpu_s):
        return cont
    others = max(0.0, cont["others_cpu_s"] - max(0.0, cpu_s - cont["own_cpu_s"]))
    share = others / max(cont["wall_s"] * (os.cpu_count() or 1), 1e-9)
    return cont | {"system_cpu_s": cpu_s, "others_cpu_s": others, "others_share": share}


def _proc_stats() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, CPU jiffies of it and its reaped children) for every process."""
    stats = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # the command name (field 2) may contain spaces; fields after its closing parenthesis are fixed
                fields = f.read().rsplit(")", 1)[1].split()
            stats[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
        except (OSError, IndexError, ValueError):
            continue
    return stats


@dataclass
class Server:
    """A running server subprocess; its output goes to a log file (kept for error reports)."""

    system: str
    proc: subprocess.Popen
    base_url: str  # ".../v1"
    model: str
    log_path: Path
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)  # the variables set on top of ours
    startup_s: float = 0.0

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> dict:
        """Ctrl-C (SIGINT), as a person would; escalates to SIGTERM/SIGKILL if it does not exit in time."""
        t0 = time.perf_counter()
        how = "sigint"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                how = "sigterm"
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    how = "sigkill"
                    self.proc.kill()
                    self.proc.wait()
        else:
            how = "already exited"
        return {"how": how, "returncode": self.proc.returncode, "stop_s": time.perf_counter() - t0}


def server_command(
    system: str,
    model_path: Path,
    threads: int,
    llama_slots: int = 16,
    llama_context: int = 8192,
    extra_args: tuple[str, ...] = (),
) -> tuple[list[str], dict[str, str], str]:
    """(argv, extra environment, model name clients send) for one server system. llama-server splits its
    context evenly over its slots (8192 / 16: 512 tokens per request by default). ``extra_args`` go at the end
    of the command line (a variant's own flags)."""
    cmd, env, model = _base_command(system, model_path, threads, llama_slots, llama_context)
    return cmd + list(extra_args), env, model


def _base_command(
    system: str, model_path: Path, threads: int, llama_slots: int, llama_context: int
) -> tuple[list[str], dict[str, str], str]:
    port = free_port()
    if system.startswith("longserve-2w"):
        cmd = [sys.executable, str(Path(__file__).with_name("_multi_worker.py")), "--port", str(port)]
        cmd += ["--workers", "2", "--threads", str(max(1, threads // 2))]
        cmd += ["--dispatch-method", "cache_aware" if system.endswith("-cache") else "shortest_queue"]
        return cmd, {}, "SmolLM2-135M-Instruct"
    if system.startswith("longserve"):
        cmd = [sys.executable, "-m", "longserve.cli", "serve", "--port", str(port)]
        cmd += ["--controller-port", str(free_port()), "--worker-port", str(free_port())]
        if system == "longserve-nocache":
            cmd += ["--no-enable-prefix-caching"]
        elif system != "longserve":
            cmd += ["--quantization", system.removeprefix("longserve-")]
        if model_path.resolve() != Path(default_model()).resolve():
            cmd += ["--model", str(model_path), "--served-model-name", model_path.stem]
            return cmd, {}, model_path.stem
        # the default model is exactly model_path; passing no --model exercises the newcomer's path
        return cmd, {}, "SmolLM2-135M-Instruct"
    if system == "llama-server":
        cmd = [str(_llama_server.binary()), "-m", str(model_path), "--host", "127.0.0.1", "--port", str(port)]
        cmd += [
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "-c",
            str(llama_context),
            "-np",
            str(llama_slots),
            "-cb",
        ]
        return cmd + ["--alias", "SmolLM2-135M-Instruct"], {}, "SmolLM2-135M-Instruct"
    per_call = 1 if system == "llamacpp-1t" else threads
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--n_ctx", "4096", "--n_threads", str(per_call)]
    cmd += ["--n_threads_batch", str(per_call), "--interrupt_requests", "False", "--verbose", "False"]
    cmd += ["--model_alias", "SmolLM2-135M-Instruct"]
    env: dict[str, str] = {}
    if system == "llamacpp-1t":
        cmd += ["--logits_all", "False"]
        env["OMP_NUM_THREADS"] = "1"
    return cmd, env, "SmolLM2-135M-Instruct"


def start_server(system: str, model_path: Path, threads: int, log_dir: Path, **options) -> Server:
    """Start one server and wait until /v1/models lists its model; raises RuntimeError with the log's tail."""
    cmd, extra_env, model = server_command(system, model_path, threads, **options)
    port = cmd[cmd.index("--port") + 1]
    log_path = log_dir / f"{system}.log"
    env = dict(os.environ) | extra_env | {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(system, proc, f"http://127.0.0.1:{port}/v1", model, log_path, cmd, extra_env)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{system} exited with {proc.returncode} during startup:\n{server.log_tail()}"
                )
            if _ready(server):
                server.startup_s = time.perf_counter() - t0
                return server
            time.sleep(0.05)  # start-to-ready is reported: poll finely
        raise RuntimeError(f"{system} not ready after {STARTUP_TIMEOUT_S:.0f}s:\n{server.log_tail()}")
    except BaseException:
        # its own session gets no Ctrl-C from the terminal: a failed or interrupted start must not leave it running
        server.stop()
        raise


def _ready(server: Server) -> bool:
    if server.system.startswith("longserve") and "longserve: serving model" not in server.log_tail(100_000):
        return False
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        resp = httpx.get(f"{server.base_url}/models", timeout=5)
        return resp.status_code == 200 and any(m["id"] == server.model for m in resp.json()["data"])
    return False


def least_contended(attempts: list[dict]) -> dict:
    """The attempt other processes disturbed least (a retry can be noisier than the first try)."""
    best = min(attempts, key=lambda a: a["contention"]["others_share"])
    shares = [round(a["contention"]["others_share"], 3) for a in attempts]
    tok_s = [round(a["summary"]["output_tokens_per_s"], 2) for a in attempts]
    return best | {"attempts": len(attempts), "attempt_others_shares": shares, "attempt_tok_s": tok_s}


# ----------------------------------------------------------------------------------------------------
# engine direct: runs in its own subprocess (this benchmark re-run with --worker engine[-int8])
# ----------------------------------------------------------------------------------------------------


def run_engine_phases(system: str, spec: dict) -> dict:
    """Load the engine as `longserve serve` does, then run each phase of the spec; returns per-phase results."""
    from _bench_util import CONTENTION_WARN, contention, cpu_snapshot, wait_for_idle

    from longserve import EngineConfig, SamplingParams
    from longserve.clients.bench_results import RequestResult, make_result, run_requests, summarize
    from longserve.engine.core_client import EngineCoreClient

    async def main() -> dict:
        quantization = "int8" if system == "engine-int8" else None
        t0 = time.perf_counter()
        engine = await EngineCoreClient.create(EngineConfig.from_env(quantization=quantization))
        load_s = time.perf_counter() - t0
        tokenizer = engine.tokenizer
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
            for p in spec["prompts"]
        ]
        extra = spec.get("engine_params", {})

        def params(max_tokens: int) -> SamplingParams:
            return SamplingParams(temperature=0.0, max_tokens=max_tokens, **extra)

        async def one(index: int, run_start: float, max_tokens: int) -> RequestResult:
            sent = time.perf_counter()
            arrivals: list[float] = []
            tokens, finish, error, seen = 0, None, None, 0
            try:
                async for out in engine.generate(prompts[index % len(prompts)], params(max_tokens)):
                    completion = out.outputs[0]
                    if len(completion.text) > seen:
                        arrivals.append(time.perf_counter())
                        seen = len(completion.text)
                    tokens = len(completion.token_ids)
                    finish = completion.finish_reason
            except Exception as exc:  # counted, as the HTTP client counts a failed request
                error = f"{type(exc).__name__}: {exc}"
            return make_result(
                index,
                sent - run_start,
                sent,
                arrivals,
                time.perf_counter(),
                usage_tokens=tokens,
                prompt_tokens=None,
                error=error,
                finish_reason=finish,
            )

        try:
            await one(0, time.perf_counter(), 8)  # warm-up, as the HTTP systems get one
            phases = []
            for phase in spec["phases"]:
                conc, n, max_tokens = phase["concurrency"], phase["requests"], spec["max_tokens"]
                request = functools.partial(one, max_tokens=max_tokens)
                attempts = []
                for _ in range(spec.get("retries", 0) + 1):
                    if spec.get("wait_idle", 0) > 0:
                        wait_for_idle(spec["wait_idle"])
                    before, tree0 = cpu_snapshot(), proc_cpu_s(os.getpid())
                    results, duration, peak = await run_requests(request, range(n), conc)
                    # the engine core is our child process: its CPU is our own too, not interference
                    cont = discount(contention(before), proc_cpu_s(os.getpid()) - tree0)
                    summary = summarize(results, conc, duration, peak)
                    finish = sorted({str(r.finish_reason) for r in results})
                    attempt = {"concurrency": conc, "summary": asdict(summary), "contention": cont}
                    attempts.append(attempt | {"finish_reasons": finish})
                    if cont["others_share"] <= CONTENTION_WARN:
                        break
                phases.append(least_contended(attempts))
            return {"ok": True, "load_s": load_s, "phases": phases}
        finally:
            await engine.ashutdown()

    return asyncio.run(main())


def spawn_engine(system: str, spec: dict, script: Path, timeout_s: float) -> dict:
    """Run the engine workload in a fresh subprocess (its own memory and threads, like a server process)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(script), "--worker", system, "--spec", str(spec_path)]
        cmd += ["--result", str(result_path)]
        env = dict(os.environ) | {"TOKENIZERS_PARALLELISM": "false"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
            rc, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, log = "timeout", f"timed out after {timeout_s}s: {exc.stdout or ''}{exc.stderr or ''}"
        try:
            result = json.loads(result_path.read_text())
        except (OSError, json.JSONDecodeError):
            result = {"ok": False, "error": f"engine worker exited {rc}", "log_tail": str(log)[-3000:]}
    return result
