"""A machine with a C++ compiler must build the C++ kernels: a broken build fails the run.

The kernels' own tests skip when the extension is unavailable (so the suite still runs where
there is no compiler), which would let a build broken by a change pass CI as a row of skips.
This check turns that case into a failure. It skips, saying why, only where there is nothing
to build with, where ``TESSERA_DISABLE_KERNELS`` forces the fallbacks, or where
``TESSERA_ALLOW_NO_KERNELS=1`` opts out explicitly. (Tests that need a CPU feature the machine
lacks, AVX-512 for the weight-panel kernel, still skip with that reason.)
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
from collections.abc import Callable, Mapping

import pytest

from tessera.model.kernels import build as kb

ALLOW_ENV = "TESSERA_ALLOW_NO_KERNELS"
_TRUE = ("1", "true", "yes")


def cxx_compiler() -> str | None:
    """Path of the compiler torch's cpp_extension runs (``$CXX``, else ``c++``), or None."""
    from torch.utils import cpp_extension

    get = getattr(cpp_extension, "get_cxx_compiler", None)
    name = get() if get is not None else (os.environ.get("CXX") or "c++")
    words = shlex.split(name)
    return shutil.which(words[0]) if words else None


def kernel_verdict(
    env: Mapping[str, str], find_compiler: Callable[[], str | None], build: Callable[[], bool]
) -> tuple[str, str]:
    """("pass" | "skip" | "fail", why). ``build`` is only called where it must succeed."""
    if env.get(ALLOW_ENV, "").strip().lower() in _TRUE:
        return "skip", f"{ALLOW_ENV} is set: the C++ kernels are not required"
    if env.get("TESSERA_DISABLE_KERNELS", "").strip().lower() in _TRUE:
        return "skip", "TESSERA_DISABLE_KERNELS is set: the pure-torch fallbacks are forced"
    compiler = find_compiler()
    if compiler is None:
        return "skip", ("no C++ compiler ($CXX or c++) on PATH: the kernels' tests skip and the"
                        " pure-torch fallbacks run")
    if build():
        return "pass", f"built with {compiler}"
    return "fail", (
        f"a C++ compiler ({compiler}) is on PATH but the C++ kernels did not build, so their"
        " tests would only skip: fix the build (the 'native kernels unavailable' warning"
        f" below says why), or set {ALLOW_ENV}=1 to accept the pure-torch fallbacks"
    )


def check_kernels(env: Mapping[str, str], find_compiler: Callable[[], str | None],
                  build: Callable[[], bool]) -> str:
    """Apply the verdict: skip or fail the calling test with its reason, else return it."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    kb.logger.addHandler(handler)
    try:
        verdict, why = kernel_verdict(env, find_compiler, build)
    finally:
        kb.logger.removeHandler(handler)
    if verdict == "skip":
        pytest.skip(why)
    if verdict == "fail":
        log = "\n".join(r.getMessage() for r in records) or (
            "(the build was tried earlier in this session: see its warning, or run this test"
            " alone)")
        pytest.fail(f"{why}\n{log}", pytrace=False)
    return why


def test_kernels_build_where_a_compiler_exists() -> None:
    check_kernels(os.environ, cxx_compiler, lambda: kb.kernel_available())


def _never_built() -> bool:
    raise AssertionError("must not build")


@pytest.mark.parametrize(
    ("env", "compiler", "built", "want"),
    [
        ({}, "/usr/bin/c++", True, "pass"),
        ({}, "/usr/bin/c++", False, "fail"),  # the case CI must not pass as skips
        ({}, None, None, "skip"),  # nothing to build with
        ({ALLOW_ENV: "1"}, "/usr/bin/c++", None, "skip"),
        ({ALLOW_ENV: "0"}, "/usr/bin/c++", False, "fail"),
        ({"TESSERA_DISABLE_KERNELS": "true"}, "/usr/bin/c++", None, "skip"),
    ],
)
def test_verdict(env: dict[str, str], compiler: str | None, built: bool | None,
                 want: str) -> None:
    build = _never_built if built is None else (lambda: built)
    verdict, why = kernel_verdict(env, lambda: compiler, build)
    assert verdict == want, why
    if want == "fail":
        assert compiler is not None and compiler in why and ALLOW_ENV in why


def test_compiler_lookup_follows_cxx(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def which(name: str) -> str | None:
        seen.append(name)
        return None if name == "missing-cxx" else f"/opt/bin/{name}"

    monkeypatch.setattr(shutil, "which", which)
    monkeypatch.setenv("CXX", "missing-cxx")
    assert cxx_compiler() is None
    monkeypatch.setenv("CXX", "clang++ -stdlib=libc++")
    assert cxx_compiler() == "/opt/bin/clang++"
    monkeypatch.delenv("CXX")
    assert cxx_compiler() == "/opt/bin/c++"
    assert seen == ["missing-cxx", "clang++", "c++"]


def test_the_check_fails_a_broken_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the check itself: compiler found, build failed (with its warning) -> failure."""

    def broken_build() -> bool:
        kb.logger.warning("native kernels unavailable, using the pure-torch fallbacks: boom")
        return False

    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)did not build.*fallbacks: boom"):
        check_kernels({}, cxx_compiler, broken_build)
    with pytest.raises(pytest.skip.Exception, match=ALLOW_ENV):
        check_kernels({ALLOW_ENV: "1"}, cxx_compiler, broken_build)
    assert check_kernels({}, cxx_compiler, lambda: True).startswith("built with /usr/bin/")
