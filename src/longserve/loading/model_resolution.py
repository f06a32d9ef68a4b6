"""What ``--model`` names, as a local path: a GGUF file, a model directory, or a Hugging Face repo id
(``Qwen/Qwen3-0.6B``) found in the local hub cache, offline (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``), at ``revision`` (a branch, tag or commit; default ``main``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from longserve.loading.errors import ModelLoadError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(model: str) -> bool:
    """``owner/name`` that is not a local path (nor a ``.gguf`` file's name)."""
    return (
        bool(_REPO_ID.match(model))
        and not model.endswith(".gguf")
        and not os.path.exists(os.path.expanduser(model))
    )


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def resolve_model_path(model: str, revision: str | None = None) -> str:
    """The local path of ``model``: itself if it exists, else its snapshot in the hub cache (a repo holding
    one GGUF file and no config.json resolves to that file). Raises ``ModelLoadError`` naming the id and the
    cache when it is not there."""
    path = os.path.expanduser(model)
    if os.path.exists(path) or not is_hub_id(model):
        if revision is not None and not is_hub_id(model) and os.path.exists(path):
            raise ModelLoadError(f"--revision {revision!r} applies to hub ids, but {model!r} is a local path")
        return path
    cache = hub_cache_dir()
    repo = cache / f"models--{model.replace('/', '--')}"
    snapshot = _snapshot(repo, revision or "main")
    if snapshot is None:
        at = f" at revision {revision!r}" if revision else ""
        raise ModelLoadError(
            f"model {model!r}{at} is not a local path and is not in the Hugging Face cache at {cache} "
            f"(this server loads offline: download it first, e.g. `huggingface-cli download {model}`)"
        )
    if (snapshot / "config.json").is_file():
        return str(snapshot)
    ggufs = sorted(snapshot.glob("*.gguf"))
    if len(ggufs) == 1:
        return str(ggufs[0])
    if ggufs:
        names = ", ".join(g.name for g in ggufs)
        raise ModelLoadError(
            f"model {model!r} holds several GGUF files ({names}): pass the one to load as a path"
        )
    raise ModelLoadError(
        f"model {model!r} in the hub cache ({snapshot}) has neither config.json nor a GGUF file"
    )


def _snapshot(repo: Path, revision: str) -> Path | None:
    """The snapshot directory of ``revision`` (a ref's commit, or a commit hash) in a cached repo."""
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None
