"""llama.cpp's own C++ ``llama-server`` (multi-slot continuous batching), built from PyPI.

llama-cpp-python's Python server serialises requests behind one lock, so it is no batched peer.
The C++ server is: ``--parallel N --cont-batching`` decodes N requests per step. llama-cpp-python
ships no binary of it, but its source distribution vendors the whole llama.cpp tree, so this
module builds ``llama-server`` (and ``llama-batched-bench``) from that sdist with CMake, natively
for this CPU, into ``.bench/llama-server/`` (about 5 minutes on 2 cores, once).

    python -m benchmarks.peers.llama_server        # build (or find) and print the binary's path
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from benchmarks.peers.llamacpp import CACHE_DIR, _sdist_version, converter_dir

BUILD_DIR = CACHE_DIR / "llama-server"
TARGETS = ("llama-server", "llama-batched-bench")
# The web UI is fetched from a model hub or built with npm; the benchmark needs only the API.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
)  # fmt: skip


def server_path(version: str | None = None) -> Path:
    """Where the built ``llama-server`` lives for ``version``."""
    # Left in the build tree: the binary finds its shared ggml/llama libraries next to it.
    return BUILD_DIR / (version or _sdist_version()) / "build" / "bin" / "llama-server"


def ensure_llama_server(version: str | None = None, jobs: int = 2) -> Path:
    """Path of a built ``llama-server``; builds it from the llama-cpp-python sdist if absent.

    Raises a one-line ``RuntimeError`` when CMake or a compiler is missing or the build fails.
    """
    version = version or _sdist_version()
    binary = server_path(version)
    if binary.is_file():
        return binary
    if shutil.which("cmake") is None:
        raise RuntimeError("building llama-server needs cmake (apt install cmake)")
    converter_dir(version)  # downloads the sdist if needed
    sdist = CACHE_DIR / "llama-cpp-python" / f"llama_cpp_python-{version}.tar.gz"
    src_root = BUILD_DIR / version / "src"
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    if not (src_root / prefix / "CMakeLists.txt").is_file():
        src_root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            tar.extractall(src_root, members=members, filter="data")
    source = src_root / prefix
    build = BUILD_DIR / version / "build"
    print(f"building llama-server {version} (about 5 minutes, once) ...", file=sys.stderr)
    try:
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "-j", str(jobs), "--target", *TARGETS],
                       check=True, stdout=subprocess.DEVNULL)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"llama-server build failed: {e}") from e
    if not binary.is_file():
        raise RuntimeError(f"llama-server build produced no {binary}")
    return binary


if __name__ == "__main__":
    try:
        print(ensure_llama_server())
    except RuntimeError as e:
        print(f"llama-server: {e}", file=sys.stderr)
        sys.exit(2)
