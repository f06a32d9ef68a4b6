"""Launcher: runs controller, worker and API server apps under Uvicorn, alone or (``serve``) the controller and
a worker in one process and the API server in processes of its own (``api_processes``).

Signals are handled here once for every server in the process. The first SIGTERM (or Ctrl-C) drains: each
part that can stops admitting and lets its running requests finish, for up to ``shutdown_timeout_s``. Then,
or at once on a second signal (or with a timeout of 0), every open stream ends with an error (the engine stops
taking work, the API server closes its streams with an error event and [DONE]), each server is asked to stop,
and the engine is waited for off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import uvicorn
import uvloop

from longserve.config import EngineConfig, ServeConfig
from longserve.loading.model_resolution import is_hub_id

if TYPE_CHECKING:  # the web stack is imported where apps are built, after the engine core is launched
    from fastapi import FastAPI

    from longserve.engine.core_client import EngineCoreClient

log = logging.getLogger(__name__)

FATAL_POLL_S = 0.5  # how often a server checks whether its engine is gone for good
READY_TIMEOUT_S = 60.0  # `serve`: the worker must be registered and listed by then, or the start failed


@dataclass
class AppSpec:
    name: str  # for messages: "controller", "worker", "api server"
    app: FastAPI
    host: str
    port: int
    on_stop: Callable[[], None] | None = None  # called on the loop when stopping begins; must not block
    # Drain: stop admitting and return once nothing runs (cut short at the shutdown timeout); None: nothing to
    # drain (the controller).
    drain: Callable[[], Awaitable[None]] | None = None
    in_flight: Callable[[], int] | None = None  # requests running now (logged when a drain times out)
    reuse_port: bool = False  # bind with SO_REUSEPORT: several processes serve this port (api_processes)


class _Server(uvicorn.Server):
    """A Uvicorn server that leaves signal handling to the launcher (several servers share one process)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def served_names(serve_config: ServeConfig, engine_config: EngineConfig) -> list[str]:
    """The names clients use for the model: ``--served-model-name`` (several: aliases), else its own."""
    names = [n.strip() for n in (serve_config.model_name or "").split(",") if n.strip()]
    return names or [model_display_name(engine_config.model)]


def model_display_name(model: str | None) -> str:
    """The name clients use for a model: the default model's name, or the file/directory name."""
    if model is None:
        return "SmolLM2-135M-Instruct"
    if is_hub_id(model):
        return model  # as vLLM: the repo id itself
    base = os.path.basename(os.path.normpath(model))
    return base[: -len(".gguf")] if base.endswith(".gguf") else base


async def run_apps(
    specs: list[AppSpec],
    on_started: Callable[[], Awaitable[None] | None] | None = None,
    fatal: Callable[[], str | None] | None = None,
    shutdown_timeout_s: float = 0.0,
    signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
) -> None:
    """Serve every app until a signal (or one server failing) stops them all.

    ``on_started`` runs once every server listens (it may be a coroutine function: the ready line waits for
    it). ``fatal`` is polled while serving; a reason from it stops everything and is raised as RuntimeError.
    The first of ``signals`` drains for up to ``shutdown_timeout_s`` (see the module's docstring).
    """
    # An open stream must not hold a shutdown forever: once stopping, in-flight requests get this long.
    configs = [
        uvicorn.Config(s.app, host=s.host, port=s.port, log_level="warning", timeout_graceful_shutdown=10)
        for s in specs
    ]
    servers = [_Server(config) for config in configs]
    loop = asyncio.get_running_loop()
    stopping = False  # a signal came: parts ending now (API processes asked to stop) are no failure
    stopped = False
    drains = [spec.drain for spec in specs if spec.drain is not None]
    draining: list[asyncio.Task] = []

    def stop_all() -> None:
        nonlocal stopping, stopped
        if stopped:
            return
        stopping = stopped = True
        for spec in specs:
            if spec.on_stop is not None:
                spec.on_stop()
        for server in servers:
            server.should_exit = True

    async def drain_then_stop() -> None:
        try:
            await asyncio.wait_for(asyncio.gather(*(drain() for drain in drains)), shutdown_timeout_s)
            log.info("drained: every running request finished")
        except TimeoutError:
            left = ", ".join(
                f"{spec.name}: {spec.in_flight()}" for spec in specs if spec.in_flight is not None
            )
            log.info("shutdown timeout (%.0f s) reached: ending the requests still running (%s)",
                     shutdown_timeout_s, left or "unknown")  # fmt: skip
        stop_all()

    def on_signal() -> None:
        nonlocal stopping
        if stopping or not drains or shutdown_timeout_s <= 0:
            stop_all()  # a second signal, or nothing to drain: stop now
            return
        stopping = True
        log.info("draining (up to %.0f s; a second signal stops at once)", shutdown_timeout_s)
        draining.append(loop.create_task(drain_then_stop(), name="drain"))

    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
    tasks: list[asyncio.Task] = []
    try:
        # One after another, in the order given: the controller listens before a worker registers with it and
        # the API server before anyone can ask it, so a normal start logs no connection errors.
        for server, spec in zip(servers, specs, strict=True):
            tasks.append(asyncio.create_task(_serve(server, spec), name=spec.name))
            while not server.started:
                done = [t for t in tasks if t.done()]
                if done:  # a server failed to start (port in use, ...): stop the others and report it
                    stop_all()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    for task in done:
                        task.result()  # raises the part's error
                    raise RuntimeError(f"the {done[0].get_name()} stopped during startup")
                await asyncio.sleep(0.01)
        if on_started is not None:
            started = on_started()
            if inspect.isawaitable(started):
                await started
        # Shielded: cancelling us must not cut Uvicorn off mid-loop (it would skip lifespan exit and leave
        # sockets open); the finally block asks every server to exit and waits for that instead.
        serving = asyncio.shield(asyncio.gather(*tasks))
        # Once stopping, parts that end first (API processes asked to stop) are no failure.
        while fatal is not None and not serving.done() and not stopping:
            await asyncio.wait([serving], timeout=FATAL_POLL_S)
            reason = None if stopping else fatal()
            if reason is not None:
                raise RuntimeError(reason)
        await serving
    finally:
        stop_all()
        for task in draining:
            task.cancel()
        await asyncio.gather(*tasks, *draining, return_exceptions=True)
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


async def _serve(server: _Server, spec: AppSpec) -> None:
    try:
        if spec.reuse_port:
            sock = socket.socket(socket.AF_INET6 if ":" in spec.host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind((spec.host, spec.port))
            except OSError as exc:
                sock.close()
                raise SystemExit(1) from exc
            await server.serve(sockets=[sock])
        else:
            await server.serve()
    except SystemExit as exc:  # Uvicorn exits the process when it cannot bind; here that is one failed part
        raise RuntimeError(
            f"could not start the {spec.name} on {spec.host}:{spec.port} (is the port in use?)"
        ) from exc


def launch_engine(engine_config: EngineConfig, serve_config: ServeConfig) -> EngineCoreClient:
    """Start the worker's engine core, a child process (the default) or a thread of this process
    (``engine_in_process``), behind one ``EngineCoreClient``; ``serve_all``/``serve_worker`` wait for it.
    The CLI calls this first, so the core's torch import and model load overlap this process's start."""
    from longserve.engine.core_client import EngineCoreClient

    return EngineCoreClient.launch(
        engine_config,
        in_process=serve_config.engine_in_process,
        stall_timeout_s=serve_config.engine_stall_timeout_s,
    )


async def serve_all(core: EngineCoreClient, serve_config: ServeConfig) -> None:
    """``longserve serve``: the controller and one worker with the model (its engine core ``launch_engine``d)
    in this process, the API server in ``api_server_count`` processes of its own (``api_processes``)."""
    from longserve.serve.api_processes import ApiServerProcesses
    from longserve.serve.controller_app import create_controller_app
    from longserve.serve.worker_app import create_worker_app

    engine_config = core.config
    host = serve_config.host
    serve_config.controller_address = f"http://{host}:{serve_config.controller_port}"
    names = served_names(serve_config, engine_config)
    name = names[0] if len(names) == 1 else ", ".join(names)
    api = ApiServerProcesses(serve_config, serve_config.api_server_count)
    api.spawn()  # their start-up overlaps the engine's; they listen once the controller is up
    try:
        engine = await core.wait_started()
    except BaseException:
        await api.stop()
        raise
    try:
        worker_app = create_worker_app(engine, serve_config, names)

        worker = worker_app.state.worker

        def begin_shutdown() -> None:
            api.begin_shutdown()  # the API servers end their streams with an error event
            worker.begin_shutdown()

        async def drain() -> None:
            api.begin_shutdown()  # the API servers drain too: they refuse new requests, finish their streams
            await worker.drain()

        specs = [
            AppSpec("controller", create_controller_app(serve_config), host, serve_config.controller_port),
            AppSpec(
                "worker",
                worker_app,
                host,
                serve_config.worker_port,
                begin_shutdown,
                drain,
                lambda: worker.in_flight,
            ),
        ]

        async def announce() -> None:
            # The ready line means a request sent now is served: the controller lists the worker's model,
            # and every API server process listens.
            await wait_until_listed(serve_config.controller_address, names[0])
            await api.start()
            url = f"http://{host}:{serve_config.api_port}"
            print(f"longserve: serving model {name!r} at {url}/v1 (Ctrl-C stops)", flush=True)
            if serve_config.web_ui:
                print(f"longserve: web chat at {url}/", flush=True)

        await run_apps(
            specs, announce, fatal=lambda: engine.failure or api.failure(),
            shutdown_timeout_s=serve_config.shutdown_timeout_s,
        )  # fmt: skip
    finally:
        await api.stop()
        await engine.ashutdown()


async def wait_until_listed(controller_address: str, model: str) -> None:
    """Wait until the controller lists ``model`` (its worker registered); RuntimeError after READY_TIMEOUT_S."""
    import httpx

    deadline = time.monotonic() + READY_TIMEOUT_S
    async with httpx.AsyncClient(timeout=5.0) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                response = await client.post(f"{controller_address}/list_models")
                if model in response.json()["models"]:
                    return
            await asyncio.sleep(0.02)
    raise RuntimeError(f"the worker did not register with the controller within {READY_TIMEOUT_S:.0f} s")


async def serve_worker(core: EngineCoreClient, serve_config: ServeConfig) -> None:
    """``longserve worker``: one model worker (its engine core ``launch_engine``d) that registers with a
    controller."""
    from longserve.serve.worker_app import create_worker_app

    names = served_names(serve_config, core.config)
    name = names[0] if len(names) == 1 else ", ".join(names)
    engine = await core.wait_started()
    try:
        app = create_worker_app(engine, serve_config, names)
        worker = app.state.worker
        spec = AppSpec(
            "worker", app, serve_config.host, serve_config.worker_port, worker.begin_shutdown, worker.drain,
            lambda: worker.in_flight,
        )  # fmt: skip
        await run_apps(
            [spec],
            lambda: print(f"longserve worker: {name!r} at {serve_config.own_worker_address}", flush=True),
            fatal=lambda: engine.failure,
            shutdown_timeout_s=serve_config.shutdown_timeout_s,
        )
    finally:
        await engine.ashutdown()


async def serve_controller(serve_config: ServeConfig) -> None:
    from longserve.serve.controller_app import create_controller_app

    spec = AppSpec(
        "controller", create_controller_app(serve_config), serve_config.host, serve_config.controller_port
    )
    await run_apps([spec], lambda: print(f"longserve controller at http://{spec.host}:{spec.port}"))


async def serve_api(serve_config: ServeConfig) -> None:
    """``longserve api``: one API server in this process, or ``api_server_count`` processes on one port."""
    host, port = serve_config.host, serve_config.api_port
    chat = f", web chat at http://{host}:{port}/" if serve_config.web_ui else ""
    ready_line = f"longserve API at http://{host}:{port}/v1{chat}"
    if serve_config.api_server_count == 1:
        await serve_api_process(serve_config, lambda: print(ready_line, flush=True), reuse_port=False)
        return
    from longserve.serve.api_processes import ApiServerProcesses

    api = ApiServerProcesses(serve_config, serve_config.api_server_count)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await api.start()
        print(f"{ready_line} ({api.count} processes)", flush=True)
        while not stop.is_set():
            reason = api.failure()
            if reason is not None:
                raise RuntimeError(reason)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), FATAL_POLL_S)
    finally:
        await api.stop()


async def serve_api_process(
    serve_config: ServeConfig,
    on_started: Callable[[], None],
    reuse_port: bool = True,
    signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
) -> None:
    """One API server: the app on ``api_port`` until one of ``signals`` drains and stops it (a process of
    ``api_processes`` takes SIGTERM only: its parent decides, Ctrl-C reaches the parent)."""
    from longserve.serve.api_server import begin_shutdown, create_api_app, drain

    app = create_api_app(serve_config)
    spec = AppSpec(
        "api server",
        app,
        serve_config.host,
        serve_config.api_port,
        lambda: begin_shutdown(app),
        reuse_port=reuse_port,
        drain=lambda: drain(app),
        in_flight=lambda: app.state.load.in_flight,
    )
    await run_apps([spec], on_started, shutdown_timeout_s=serve_config.shutdown_timeout_s, signals=signals)


def run(coro) -> int:
    """Run a launcher coroutine from the CLI; a startup failure is one line on stderr, exit code 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per internal request is noise
    try:
        # uvloop: the event loop's own per-token costs (epoll, socket writes, wakeups) in C.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro)
    except KeyboardInterrupt:
        pass
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
