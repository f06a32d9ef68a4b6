"""``longserve viz``: draw attention heatmaps, MoBA block maps or MoE routing charts to a PNG or SVG file."""

from __future__ import annotations

import argparse
import sys

from longserve import viz
from longserve.loading.errors import ModelLoadError
from longserve.viz.checks import VizError
from longserve.viz.figures import output_format

EXIT_USAGE = 2  # argparse's own code for a bad command line


def _indices(text: str) -> list[int]:
    """``"0,3"`` -> [0, 3]."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one index")
    return values


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    commands = parser.add_subparsers(dest="picture", required=True)
    model_help = "GGUF file or HF model directory (default: the default SmolLM2-135M-Instruct GGUF)"

    attention = commands.add_parser(
        "attention", help="attention weights of chosen layers and heads on a prompt (reference backend)"
    )
    attention.add_argument("--prompt", required=True, help="the text to run through the model")
    attention.add_argument("--model", help=model_help)
    attention.add_argument("--layers", type=_indices, default=[0], help="comma-separated (default: 0)")
    attention.add_argument("--heads", type=_indices, help="comma-separated (default: the first 4)")
    attention.add_argument("-o", "--output", default="attention.png", help=".png or .svg")

    moba = commands.add_parser("moba", help="the key blocks MoBA gating chose per query block, per head")
    prompt = moba.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-file", help="a text file to run through the model")
    prompt.add_argument("--prompt", help="the text itself")
    moba.add_argument("--chunk-size", type=int, required=True, help="MoBA block size in tokens")
    moba.add_argument("--topk", type=int, required=True, help="blocks per query, its own included")
    moba.add_argument("--model", help=model_help)
    moba.add_argument("--layer", type=int, default=0, help="the layer whose gating is drawn (default: 0)")
    moba.add_argument("--heads", type=_indices, help="comma-separated (default: the first 4)")
    moba.add_argument("-o", "--output", default="moba.png", help=".png or .svg")

    moe = commands.add_parser("moe", help="tokens per expert per layer, and each token's experts")
    moe.add_argument("--model", required=True, help="an MoE model: HF directory or GGUF file")
    moe.add_argument("--prompt", required=True, help="the text to run through the model")
    moe.add_argument("--layer", type=int, help="the layer of the per-token map (default: the first MoE one)")
    moe.add_argument("-o", "--output", default="moe.png", help=".png or .svg")
    return parser


def main(argv: list[str] | None, prog: str = "longserve viz") -> int:
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad command line (2): argparse has printed why
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        output_format(args.output)  # before the model loads: a bad name fails at once
        path = _draw(args)
    except (VizError, ModelLoadError, OSError) as exc:
        print(f"{prog} {args.picture}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(path)
    return 0


def _draw(args: argparse.Namespace) -> str:
    """Capture what ``args`` asks for, draw it to ``args.output``; returns the path written."""
    if args.picture == "attention":
        capture = viz.capture_attention(args.prompt, args.model, args.layers, args.heads)
        viz.plot_attention(capture, args.output)
    elif args.picture == "moba":
        text = args.prompt if args.prompt is not None else _read(args.prompt_file)
        capture = viz.capture_moba(text, args.chunk_size, args.topk, args.model, args.layer, args.heads)
        viz.plot_moba_blocks(capture, args.output)
    else:
        capture = viz.capture_moe_routing(args.prompt, args.model, args.layer)
        viz.plot_moe_routing(capture, args.output)
    return args.output


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()
