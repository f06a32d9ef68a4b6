"""Command-line entry point: ``longserve generate`` (serving subcommands arrive with the serving stack)."""

from __future__ import annotations

import argparse
import sys
import time

from longserve.config import EngineConfig
from longserve.engine.sampling_params import SamplingParams


def _engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="GGUF file or Hugging Face model directory (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weight/activation dtype")
    parser.add_argument(
        "--quantization",
        choices=["int8"],
        help="int8: dynamic-int8 decode matmuls on CPU (~2x faster, approximate)",
    )
    parser.add_argument("--attention", choices=["dense", "reference"], help="attention backend")
    parser.add_argument("--max-model-len", type=int, help="context length cap (default: the model's)")
    parser.add_argument("--kv-cache-memory-mb", type=int, help="KV cache size in MiB")
    parser.add_argument("--threads", type=int, dest="num_threads", help="torch threads (default: all cores)")


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig.from_env(
        model=args.model,
        dtype=args.dtype,
        quantization=args.quantization,
        attention=args.attention,
        max_model_len=args.max_model_len,
        kv_cache_memory_mb=args.kv_cache_memory_mb,
        num_threads=args.num_threads,
        show_progress=True,
    )


def _generate(args: argparse.Namespace) -> int:
    from longserve.engine.engine import LLMEngine

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
        engine = LLMEngine(_engine_config(args))
        prompt = args.prompt
        if not args.no_chat:
            if engine.tokenizer.chat_template is None:
                print("note: the model has no chat template; sending the prompt as raw text", file=sys.stderr)
            else:
                messages = [{"role": "user", "content": prompt}]
                if args.system:
                    messages.insert(0, {"role": "system", "content": args.system})
                prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        request = engine.build_request("cli", prompt, params)
    except ValueError as exc:  # ModelLoadError included
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine.add_request(request)
    start, first, tokens = time.perf_counter(), None, 0
    finish = None
    while engine.has_unfinished():
        for output in engine.step():
            completion = output.outputs[0]
            first = first or time.perf_counter()
            tokens += len(completion.delta_token_ids)
            sys.stdout.write(completion.delta_text)
            sys.stdout.flush()
            finish = completion.finish_reason
    elapsed = time.perf_counter() - (first or start)
    print(flush=True)
    rate = (tokens - 1) / elapsed if tokens > 1 and elapsed > 0 else 0.0
    print(
        f"[{len(request.prompt_token_ids)} prompt tokens, {tokens} generated, finish: {finish}, "
        f"first token {((first or start) - start) * 1000:.0f} ms, {rate:.1f} tok/s]",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longserve", description="LLM serving with a paged-KV PyTorch engine"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser(
        "generate", help="generate a completion for one prompt, streamed to the terminal"
    )
    gen.add_argument("prompt")
    _engine_arguments(gen)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
