"""Builds Tessera's C++ CPU kernels once, on first use, with torch's cpp_extension.

Every ``*.cpp`` listed in ``_SOURCES`` is compiled into one extension that registers its ops
under ``torch.ops.tessera_kernels``. Nothing is compiled on import: ``kernel_available`` builds on
its first call; later processes reuse the build cached in torch's extensions directory (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``) and load it in well under a second. When the build fails
or ``TESSERA_DISABLE_KERNELS=1`` is set, ``kernel_available`` is False and every op's caller
runs its pure-torch fallback.

A build never hangs a start: a lock left by a builder that was killed is cleared
(:mod:`tessera.model.kernels.build_lock`), and a build, or a wait for another process's build,
that takes longer than ``TESSERA_KERNEL_BUILD_TIMEOUT_S`` (default 600 s) gives a warning and
the fallbacks.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import torch

from tessera.model.kernels.build_lock import build_lock

logger = logging.getLogger(__name__)

DEFAULT_BUILD_TIMEOUT_S = 600.0
"""Longest a first start waits for the kernels: 11-18 s builds on 2 busy cores, so a build that
has not finished in 10 minutes is stuck (or the machine is), and the fallbacks are better."""

_HERE = Path(__file__).parent
_SOURCES = [
    _HERE / "paged_decode.cpp",
    _HERE / "fused_ops.cpp",
    _HERE / "decode_units.cpp",
    _HERE / "argmax.cpp",
    _HERE / "moe_experts.cpp",
    _HERE / "panel_linear.cpp",
]

_lock = threading.Lock()
_state: dict[str, bool] = {}  # "tried": build attempted; "ok": ops registered and usable


def kernels_disabled() -> bool:
    """True when ``TESSERA_DISABLE_KERNELS`` is set to a true value (forces the fallbacks)."""
    return os.environ.get("TESSERA_DISABLE_KERNELS", "").strip().lower() in ("1", "true", "yes")


def _native_arch() -> str | None:
    """The CPU the compiler targets with ``-march=native`` (e.g. ``sapphirerapids``), or None
    if it does not accept the flag. Part of the extension name, so a build cached on a shared
    home directory is never loaded on a machine with a different instruction set."""
    cxx = os.environ.get("CXX", "c++")
    try:
        res = subprocess.run(
            [cxx, "-march=native", "-Q", "--help=target"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "-march=":
            return "".join(c if c.isalnum() else "_" for c in parts[1])
    return "native"  # accepted, but the compiler (e.g. clang) does not print the target


def _ensure_ninja_on_path() -> None:
    """cpp_extension looks for ``ninja`` on PATH; the pip package puts it in the venv's bin,
    which is not on PATH when the interpreter is run without activating the venv."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def build_timeout_s() -> float:
    """The build's time limit: ``TESSERA_KERNEL_BUILD_TIMEOUT_S`` or the default."""
    text = os.environ.get("TESSERA_KERNEL_BUILD_TIMEOUT_S", "").strip()
    try:
        value = float(text) if text else DEFAULT_BUILD_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        logger.warning("TESSERA_KERNEL_BUILD_TIMEOUT_S=%r is not a positive number of seconds;"
                       " using %.0f", text, DEFAULT_BUILD_TIMEOUT_S)
        return DEFAULT_BUILD_TIMEOUT_S
    return value


def _build_directory(name: str) -> Path:
    """Where torch builds extension ``name``; passed to ``load`` explicitly, so the lock and
    the build always agree on the directory."""
    from torch.utils import cpp_extension

    find = getattr(cpp_extension, "_get_build_directory", None)
    if find is not None:  # torch's own choice (it also separates Python versions)
        return Path(find(name, False))
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / name


def _load_bounded(name: str, flags: list[str], ldflags: list[str], timeout_s: float) -> None:
    """``cpp_extension.load`` under Tessera's build lock, giving up after ``timeout_s``.

    The build runs in a daemon thread that holds the lock until it ends, so a build this
    process abandons is never mistaken for a dead one by another process; if this process
    exits first, the lock dies with it and the next start clears torch's baton."""
    from torch.utils import cpp_extension

    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            build_dir = _build_directory(name)
            with build_lock(build_dir, timeout_s):
                cpp_extension.load(
                    name=name,
                    sources=[str(s) for s in _SOURCES],
                    extra_cflags=flags,
                    extra_ldflags=ldflags,
                    build_directory=str(build_dir),
                    is_python_module=False,
                    verbose=False,
                )
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            outcome.append(e)

    worker = threading.Thread(target=run, name=f"build-{name}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        raise TimeoutError(f"not built within {timeout_s:.0f} s (TESSERA_KERNEL_BUILD_TIMEOUT_S);"
                           " left to finish in the background")
    if outcome[0] is not None:
        raise outcome[0]


def _build() -> bool:
    """Compile and register the ``torch.ops.tessera_kernels`` ops; False on any failure."""
    _ensure_ninja_on_path()
    arch = _native_arch()
    # ``at::parallel_for`` is a header template: under torch's OpenMP backend it only runs in
    # parallel when the extension itself is compiled with OpenMP; without the flag every kernel
    # ran on one thread (batched decode attention measured 2-3x slower on 2 cores). The
    # extension links the same ``libgomp.so.1`` torch has already loaded (one thread pool).
    omp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    attempts: list[tuple[str, list[str], list[str]]] = []
    if arch is not None:
        attempts.append((f"tessera_kernels_{arch}", ["-O3", "-march=native", *omp], omp))
    attempts.append(("tessera_kernels_generic", ["-O3", *omp], omp))
    if omp:
        attempts.append(("tessera_kernels_serial", ["-O3"], []))
    errors = []
    limit_s = build_timeout_s()
    deadline_s = time.monotonic() + limit_s
    for name, flags, ldflags in attempts:
        left_s = deadline_s - time.monotonic()
        if left_s <= 0:
            errors.append(f"{name}: not tried, the {limit_s:.0f} s build limit was spent")
            continue
        try:
            _load_bounded(name, flags, ldflags, left_s)
            torch.ops.tessera_kernels.paged_decode  # noqa: B018 - raises if not registered
            return True
        except Exception as e:  # noqa: BLE001 - a build failure must never crash the engine
            errors.append(f"{name} ({' '.join(flags)}): {type(e).__name__}: {e}")
    logger.warning(
        "native kernels unavailable, using the pure-torch fallbacks: %s",
        " | ".join(errors)[:2000],
    )
    return False


def kernel_available() -> bool:
    """Whether the C++ kernels can run here; builds them on the first call (thread-safe)."""
    if kernels_disabled():
        return False
    if "tried" not in _state:
        with _lock:
            if "tried" not in _state:
                _state["ok"] = _build()
                _state["tried"] = True
    return _state["ok"]
