"""The CPU peer: llama.cpp's own C++ ``llama-server``, built once from the llama.cpp vendored in the
``llama-cpp-python==0.3.36`` sdist and cached (the Python ``llama_cpp.server`` serialises requests, so it is not
a fair peer). ``LONGSERVE_LLAMA_SERVER`` names a prebuilt binary instead.

    python benchmarks/_llama_server.py        # build (~5-10 min on 2 cores) and print the binary's path
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "longserve" / f"llama.cpp-{VERSION}"
TOOLS = ("llama-server", "llama-perplexity", "llama-quantize")


def binary(name: str = "llama-server", build: bool = True) -> Path | None:
    """Path to a built llama.cpp tool; builds every tool in ``TOOLS`` on first use (None if ``build`` is off)."""
    if name == "llama-server" and os.environ.get("LONGSERVE_LLAMA_SERVER"):
        return Path(os.environ["LONGSERVE_LLAMA_SERVER"])
    path = CACHE / "bin" / name
    if path.is_file():
        return path
    if not build:
        return None
    _build()
    return path


def _build() -> None:
    """Download the sdist, then configure and build in the cache: an interrupted build resumes where it stopped."""
    if shutil.which("cmake") is None:
        raise RuntimeError("building llama-server needs cmake and a C++ compiler (apt install cmake g++)")
    source = CACHE / "src" / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                 f"llama-cpp-python=={VERSION}", "-d", tmp],
                check=True,
            )  # fmt: skip
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(sdist) as archive:
                archive.extractall(CACHE / "src", filter="data")
    build = source / "build"
    subprocess.run(
        ["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=ON",
         "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "--build", str(build), "--target", *TOOLS, "-j", jobs], check=True)
    (CACHE / "bin").mkdir(parents=True, exist_ok=True)
    for tool in TOOLS:
        shutil.copy2(build / "bin" / tool, CACHE / "bin" / tool)


if __name__ == "__main__":
    print(binary())
