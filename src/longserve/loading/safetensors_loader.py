"""Load a Hugging Face model directory (config.json, *.safetensors, tokenizer) into a memory-mapped Checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import torch
from safetensors import SafetensorError, safe_open

from longserve.loading.checkpoint import Checkpoint
from longserve.loading.errors import ModelLoadError
from longserve.loading.pooling_config import read_pooling_config
from longserve.loading.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def load_safetensors_dir(path: str, *, show_progress: bool = False) -> Checkpoint:
    """Load ``path`` as an HF model directory; tensors stay memory-mapped, in their stored dtype, under HF names.

    Raises ``ModelLoadError`` naming the offending file when the config, a weight file or the tokenizer is
    missing or unreadable.
    """
    if not os.path.isdir(path):
        raise ModelLoadError(f"{path}: not a model directory")
    config = _read_json_object(os.path.join(path, CONFIG_FILE))
    plan = _weight_plan(path)
    tokenizer = _load_tokenizer(path)
    pooling = read_pooling_config(path)
    weights = _load_weights(plan, show_progress=show_progress)
    return Checkpoint(
        config=config, weights=weights, tokenizer=tokenizer, path=path, format="safetensors", pooling=pooling
    )


def _read_json_object(file: str) -> dict:
    """Parse ``file`` as a JSON object, turning every failure into a ModelLoadError that names it."""
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{file}: file is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{file}: cannot be read: {e}") from e
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{file}: invalid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ModelLoadError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def _weight_plan(path: str) -> dict[str, list[str] | None]:
    """Which safetensors files to read and, for an indexed checkpoint, which tensors to take from each.

    ``None`` as the tensor list means "every tensor in the file". The index wins over loose files because a
    directory may also hold other exports (e.g. ``consolidated.safetensors``) under different tensor names.
    """
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.exists(index_path):
        return _plan_from_index(path, index_path)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return {single: None}
    files = sorted(
        os.path.join(path, name)
        for name in os.listdir(path)
        if name.endswith(".safetensors") and os.path.isfile(os.path.join(path, name))
    )
    if not files:
        raise ModelLoadError(f"{path}: no {SINGLE_FILE}, {INDEX_FILE} or other *.safetensors weight files")
    return dict.fromkeys(files)


def _plan_from_index(path: str, index_path: str) -> dict[str, list[str]]:
    """Group the index's tensor names by shard, checking that every shard it names exists."""
    index = _read_json_object(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index_path}: no 'weight_map' object mapping tensor names to shard files")
    plan: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            raise ModelLoadError(
                f"{index_path}: tensor {name!r} maps to {shard!r}, not a file name in {path}"
            )
        plan.setdefault(os.path.join(path, shard), []).append(name)
    for shard in plan:
        if not os.path.isfile(shard):
            raise ModelLoadError(f"{shard}: shard named by {INDEX_FILE} is missing")
    return plan


def _load_tokenizer(path: str) -> Tokenizer:
    """Load the directory's tokenizer; failures that are not already ModelLoadErrors are wrapped into one."""
    try:
        return Tokenizer.from_hf_dir(path)
    except ModelLoadError:
        raise
    except FileNotFoundError as e:
        missing = e.filename or os.path.join(path, "tokenizer.json")
        raise ModelLoadError(f"{missing}: tokenizer file is missing") from e
    except Exception as e:  # the tokenizers library raises plain Exception subclasses on malformed files
        raise ModelLoadError(f"{path}: cannot load the tokenizer: {e}") from e


def _load_weights(plan: dict[str, list[str] | None], *, show_progress: bool) -> dict[str, torch.Tensor]:
    """Open every file in ``plan`` and collect its tensors as views into the file's memory mapping."""
    with contextlib.ExitStack() as stack:
        # Open (and so validate the header of) every file before reading any tensor.
        handles = {file: stack.enter_context(_open(file)) for file in plan}
        names = {file: _tensor_names(file, handles[file], wanted) for file, wanted in plan.items()}
        weights: dict[str, torch.Tensor] = {}
        with _progress(show_progress, total=sum(map(len, names.values()))) as advance:
            for file, file_names in names.items():
                for name in file_names:
                    if name in weights:
                        raise ModelLoadError(f"{file}: tensor {name!r} also appears in another weight file")
                    try:
                        # A view into the file's copy-on-write mapping: nothing is read until it is used.
                        weights[name] = handles[file].get_tensor(name)
                    except SafetensorError as e:
                        raise ModelLoadError(f"{file}: cannot read tensor {name!r}: {e}") from e
                    advance(os.path.basename(file))
    return weights


@contextlib.contextmanager
def _open(file: str) -> Iterator:
    """``safe_open`` with header and size errors reported as ModelLoadErrors naming ``file``."""
    try:
        handle = safe_open(file, framework="pt")
    except SafetensorError as e:
        raise ModelLoadError(f"{file}: not a valid safetensors file: {e}") from e
    except OSError as e:
        raise ModelLoadError(f"{file}: cannot be read: {e}") from e
    with handle as f:
        yield f


def _tensor_names(file: str, handle, wanted: list[str] | None) -> list[str]:
    """The tensors to take from ``file``: all of them, or the index's list after checking each is present."""
    available = handle.keys()
    if wanted is None:
        return sorted(available)
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise ModelLoadError(
            f"{file}: tensors listed for it in {INDEX_FILE} are missing: {', '.join(missing[:5])}"
        )
    return wanted


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator:
    """Yield ``advance(label)``; with ``enabled`` it drives a rich progress bar counting loaded tensors."""
    if not enabled:
        yield lambda label: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("loading {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    # stderr, so stdout stays the program's output (a served URL, generated text)
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("weights", total=total)

        def advance(label: str) -> None:
            progress.update(task, advance=1, description=label)

        yield advance
