"""The CPU kernels, compiled for this machine's CPU into one extension module on first use and cached by torch's
extension builder (~1-2 min once; later starts load the cached library): the matmuls over GGUF block weights
(``layers/csrc/ggml_packed.cpp``), the small per-layer ops (``layers/csrc/cpu_ops.cpp``), LoRA updates
(``layers/csrc/lora_cpu.cpp``), paged decode attention (``attention/csrc/paged_decode_cpu.cpp``) and a whole
decoder layer of a decode step built from them (``layers/csrc/decoder_layer_cpu.cpp``).

Built with ``-march=native``: the machines we run on differ (AVX2, AVX-512), and the cache directory is
keyed by the source and flags, so a different host rebuilds instead of loading code for the wrong CPU.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)
_PACKAGE = Path(__file__).resolve().parent.parent
HEADERS = _PACKAGE / "layers" / "csrc"  # cpu_kernels.h (the module's functions), vec_math.h (exp, dot)
SOURCES = (
    HEADERS / "ggml_packed.cpp",
    HEADERS / "cpu_ops.cpp",
    HEADERS / "lora_cpu.cpp",
    HEADERS / "decoder_layer_cpu.cpp",
    _PACKAGE / "attention" / "csrc" / "paged_decode_cpu.cpp",
)


@functools.cache
def cpu_kernels(march: str = "native") -> ModuleType:
    """The compiled module (``packed_linear``, ``rms_norm``, ``silu_mul``, ``rotary_``,
    ``lora_add_``, ``paged_decode``, ``DecoderLayerCpu``); raises RuntimeError if it cannot be built. ``march`` other than native builds another instruction set's code paths (the tests
    check the AVX2 and the scalar paths on an AVX-512 machine)."""
    from torch.utils.cpp_extension import load

    _find_ninja()
    # One build per source version, CPU model and checkout: -march=native code must not be reused on another
    # CPU, and torch's builder rebuilds when the same name points at a source elsewhere (two checkouts sharing
    # ~/.cache would rebuild each other's library at every start).
    files = sorted([*SOURCES, *HEADERS.glob("*.h")])
    identity = b"".join(path.read_bytes() + str(path).encode() for path in files)
    identity += _cpu_model().encode() + march.encode()
    key = hashlib.sha256(identity).hexdigest()[:12]
    start = time.perf_counter()
    try:
        module = load(
            name=f"longserve_ggml_{key}",
            sources=[str(path) for path in SOURCES],
            extra_include_paths=[str(HEADERS)],
            extra_cflags=["-O3", f"-march={march}", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except (
        OSError,
        RuntimeError,
        ImportError,
    ) as exc:  # no compiler or headers: say so, never fall back silently
        raise RuntimeError(f"cannot build the CPU kernels: {exc}") from exc
    log.info("CPU kernels ready in %.1f s", time.perf_counter() - start)
    return module


def _find_ninja() -> None:
    """torch's builder runs ``ninja`` from PATH; a venv used without activation has it beside the interpreter."""
    beside = Path(sys.executable).parent
    if shutil.which("ninja") is None and (beside / "ninja").is_file():
        os.environ["PATH"] = f"{beside}{os.pathsep}{os.environ.get('PATH', '')}"


def _cpu_model() -> str:
    """The first CPU's model name and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    model = next((line for line in lines if line.startswith("model name")), "")
    flags = next((line for line in lines if line.startswith("flags")), "")
    return model + flags
