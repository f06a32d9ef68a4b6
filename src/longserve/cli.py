"""Command-line entry point: serve | controller | worker | api | generate | chat | batch | bench | viz."""

from __future__ import annotations

import argparse
import sys
import time

from longserve.engine.sampling_params import SamplingParams
from longserve.engine_options import add_engine_arguments, engine_config_from_args


def _generate(args: argparse.Namespace) -> int:
    from longserve.engine.engine import LLMEngine
    from longserve.engine.output_processor import RequestText
    from longserve.engine.protocol import EngineRequest

    engine = None
    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            max_tokens=args.max_tokens,
            stop=args.stop or [],
        )
        engine = LLMEngine(engine_config_from_args(args))
        prompt = args.prompt
        if not args.no_chat:
            if engine.tokenizer.chat_template is None:
                print("note: the model has no chat template; sending the prompt as raw text", file=sys.stderr)
            else:
                messages = [{"role": "user", "content": prompt}]
                if args.system:
                    messages.insert(0, {"role": "system", "content": args.system})
                prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = engine.tokenizer.encode(prompt, add_special_tokens=args.no_chat)
        engine.limits.check_prompt(ids, params)
        request = EngineRequest("cli", ids, params)
    except ValueError as exc:  # ModelLoadError included
        print(f"error: {exc}", file=sys.stderr)
        if engine is not None:
            engine.close()
        return 2
    text = RequestText(engine.tokenizer, ids, params)
    engine.add_request(request)
    start, first, tokens = time.perf_counter(), None, 0
    finish = None
    try:
        while engine.has_unfinished():
            for delta in engine.step():
                first = first or time.perf_counter()
                pieces, stopped = text.apply(delta)
                for piece in pieces:
                    tokens += len(piece.token_ids)
                    sys.stdout.write(piece.text)
                    finish = piece.finish_reason or finish
                sys.stdout.flush()
                if stopped:
                    engine.abort("cli")  # a stop string ended the reply
    finally:
        engine.close()  # the other tensor-parallel ranks, if any
    elapsed = time.perf_counter() - (first or start)
    print(flush=True)
    rate = (tokens - 1) / elapsed if tokens > 1 and elapsed > 0 else 0.0
    print(
        f"[{len(request.prompt_token_ids)} prompt tokens, {tokens} generated, finish: {finish}, "
        f"first token {((first or start) - start) * 1000:.0f} ms, {rate:.1f} tok/s]",
        file=sys.stderr,
    )
    return 0


def _worker_admission_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine-in-process",
        action="store_true",
        default=None,
        help="run the engine on a thread of the worker process, not in its own process (debugging)",
    )
    parser.add_argument(
        "--max-queue-len",
        type=int,
        help="requests that may wait for a worker slot; more get 429 (default 256)",
    )
    parser.add_argument(
        "--engine-stall-timeout",
        type=float,
        dest="engine_stall_timeout_s",
        help="seconds the engine may run requests without completing a step before it is restarted "
        "(default 60)",
    )
    parser.add_argument(
        "--worker-stream-keepalive",
        type=float,
        dest="worker_stream_keepalive_s",
        help="seconds between keep-alive lines on a silent stream (default 5)",
    )


def _shutdown_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        dest="shutdown_timeout_s",
        help="on SIGTERM/Ctrl-C, seconds running requests may take to finish before they end with an error "
        "(default 30; 0 stops at once; a second signal stops at once)",
    )


def _serve_arguments(parser: argparse.ArgumentParser, *, api: bool, worker: bool, controller: bool) -> None:
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    if api:
        parser.add_argument("--port", type=int, dest="api_port", help="API server port (default 8000)")
        parser.add_argument("--api-keys", help="comma-separated keys clients must send as Bearer tokens")
        parser.add_argument(
            "--api-server-count",
            type=int,
            help="API server processes sharing the port, each with its own streams to the workers (default 1)",
        )
        parser.add_argument(
            "--max-in-flight-requests",
            type=int,
            help="generation requests the API server handles at once; more get 429 (default 4096)",
        )
        parser.add_argument(
            "--worker-stream-timeout",
            type=float,
            dest="worker_stream_timeout_s",
            help="seconds a worker stream may stay silent before the request fails (default 60; keep it well "
            "above the workers' --worker-stream-keepalive)",
        )
        parser.add_argument(
            "--request-timeout",
            type=float,
            dest="request_timeout_s",
            help="seconds a whole request may take before it ends with a timeout error (default: none)",
        )
        parser.add_argument(
            "--request-stall-timeout",
            type=float,
            dest="request_stall_timeout_s",
            help="seconds a request's stream may bring no token before it ends with a timeout error "
            "(default: none)",
        )
        parser.add_argument(
            "--no-web-ui",
            action="store_false",
            dest="web_ui",
            default=None,
            help="do not serve the web chat page at / (the API is unchanged)",
        )
    if worker:
        parser.add_argument("--worker-port", type=int, help="worker port (default 21002)")
        parser.add_argument(
            "--served-model-name",
            "--model-name",
            nargs="+",
            dest="model_name",
            help="the name(s) clients use for the model, several being aliases (default: its repo id or "
            "file name)",
        )
        parser.add_argument("--worker-concurrency", type=int, help="requests a worker admits at once")
        parser.add_argument(
            "--tool-call-parser",
            help="the model's tool-call format for tool_choice 'auto': hermes, llama3_json, mistral, "
            "deepseek_v3 (default: detected from the chat template)",
        )
        parser.add_argument(
            "--reasoning-parser",
            help="the model's reasoning format, split into reasoning_content: deepseek_r1, qwen3, think, "
            "mistral (default: detected from the chat template)",
        )
        _worker_admission_arguments(parser)
    if controller:
        parser.add_argument("--controller-port", type=int, help="controller port (default 21001)")
        parser.add_argument("--dispatch-method", choices=["shortest_queue", "lottery"])
        parser.add_argument("--heart-beat-expiration", type=float, dest="heart_beat_expiration_s")
    parser.add_argument("--heart-beat-interval", type=float, dest="heart_beat_interval_s")


def _serve_config(args: argparse.Namespace, **extra):
    from longserve.config import ServeConfig

    keys = (
        "host",
        "api_port",
        "api_keys",
        "worker_port",
        "model_name",
        "worker_concurrency",
        "max_queue_len",
        "max_in_flight_requests",
        "api_server_count",
        "worker_stream_timeout_s",
        "worker_stream_keepalive_s",
        "request_timeout_s",
        "request_stall_timeout_s",
        "controller_port",
    )
    keys += ("dispatch_method", "heart_beat_expiration_s", "heart_beat_interval_s", "controller_address")
    keys += ("worker_address", "engine_in_process", "tool_call_parser", "reasoning_parser", "web_ui")
    keys += ("shutdown_timeout_s", "engine_stall_timeout_s")
    values = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if isinstance(values.get("model_name"), list):
        values["model_name"] = ",".join(values["model_name"])
    return ServeConfig.from_env(**values, **extra)


def _run_server(args: argparse.Namespace) -> int:
    from longserve.serve import launcher

    try:
        serve_config = _serve_config(args)
        if args.command == "controller":
            return launcher.run(launcher.serve_controller(serve_config))
        if args.command == "api":
            return launcher.run(launcher.serve_api(serve_config))
        engine_config = engine_config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if engine_config.tensor_parallel_size > 1:  # (a worker without it never imports torch: its core does)
        from longserve.engine.tensor_parallel import follows_only, run_follower_node

        if follows_only(engine_config):  # a node (or torchrun process) that runs ranks but not the engine
            return run_follower_node(engine_config)
    core = launcher.launch_engine(engine_config, serve_config)  # first: it loads while the rest starts
    if args.command == "worker":
        return launcher.run(launcher.serve_worker(core, serve_config))
    return launcher.run(launcher.serve_all(core, serve_config))


def _bench(args: argparse.Namespace) -> int:
    from longserve.clients import bench

    return bench.main(args.tool_args, prog="longserve bench")


def _batch(args: argparse.Namespace) -> int:
    from longserve.clients import batch

    return batch.main(args.tool_args, prog="longserve batch")


def _chat(args: argparse.Namespace) -> int:
    from longserve.clients import chat

    return chat.main(args.tool_args, prog="longserve chat")


def _viz(args: argparse.Namespace) -> int:
    from longserve.viz import cli as viz_cli

    return viz_cli.main(args.tool_args, prog="longserve viz")


_TOOLS_WITH_OWN_OPTIONS = frozenset({"bench", "batch", "chat", "viz"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longserve", description="LLM serving with a paged-KV PyTorch engine"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="controller + one worker + OpenAI-compatible API, in one process"
    )
    add_engine_arguments(serve)
    _serve_arguments(serve, api=True, worker=True, controller=True)
    _shutdown_arguments(serve)
    serve.set_defaults(handler=_run_server)
    controller = commands.add_parser("controller", help="the controller alone (workers register with it)")
    _serve_arguments(controller, api=False, worker=False, controller=False)
    controller.add_argument(
        "--port", type=int, dest="controller_port", help="controller port (default 21001)"
    )
    controller.add_argument("--dispatch-method", choices=["shortest_queue", "lottery", "cache_aware"])
    controller.add_argument("--heart-beat-expiration", type=float, dest="heart_beat_expiration_s")
    controller.set_defaults(handler=_run_server)
    worker = commands.add_parser("worker", help="one model worker that registers with a controller")
    add_engine_arguments(worker)
    _serve_arguments(worker, api=False, worker=False, controller=False)
    _shutdown_arguments(worker)
    worker.add_argument("--port", type=int, dest="worker_port", help="worker port (default 21002)")
    worker.add_argument("--controller-address", help="controller URL (default http://127.0.0.1:21001)")
    worker.add_argument("--worker-address", help="URL the controller uses to reach this worker")
    worker.add_argument(
        "--served-model-name", "--model-name", nargs="+", dest="model_name",
        help="the name(s) clients use for the model, several being aliases (default: its repo id or file name)",
    )  # fmt: skip
    worker.add_argument("--worker-concurrency", type=int, help="requests this worker admits at once")
    _worker_admission_arguments(worker)
    worker.set_defaults(handler=_run_server)
    api = commands.add_parser("api", help="the OpenAI-compatible API server alone")
    _serve_arguments(api, api=True, worker=False, controller=False)
    _shutdown_arguments(api)
    api.add_argument("--controller-address", help="controller URL (default http://127.0.0.1:21001)")
    api.set_defaults(handler=_run_server)
    gen = commands.add_parser(
        "generate", help="generate a completion for one prompt, streamed to the terminal"
    )
    gen.add_argument("prompt")
    add_engine_arguments(gen)
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--system", help="system message for the chat template")
    gen.add_argument("--no-chat", action="store_true", help="raw completion: do not apply the chat template")
    gen.set_defaults(handler=_generate)
    bench = commands.add_parser(
        "bench",
        add_help=False,  # `longserve bench --help` shows the load generator's own options
        help="load generator: concurrent streaming requests against an OpenAI-compatible server; "
        "TTFT, inter-token latency, tok/s",
    )
    bench.set_defaults(handler=_bench)
    batch = commands.add_parser(
        "batch",
        add_help=False,  # `longserve batch --help` shows the batch client's own options
        help="OpenAI batch JSONL in, answers out: concurrent, retried, resumable (rerun to finish)",
    )
    batch.set_defaults(handler=_batch)
    chat = commands.add_parser(
        "chat",
        add_help=False,  # `longserve chat --help` shows the REPL's own options
        help="terminal chat against a server or a local model: streaming, /system, /reset, /exit",
    )
    chat.set_defaults(handler=_chat)
    viz = commands.add_parser(
        "viz",
        add_help=False,  # `longserve viz --help` shows the pictures it draws
        help="pictures: attention heatmaps, MoBA block maps, MoE routing charts (PNG or SVG)",
    )
    viz.set_defaults(handler=_viz)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in _TOOLS_WITH_OWN_OPTIONS:
        args.tool_args = rest  # the load generator, batch client, chat REPL and viz parse their own options
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
