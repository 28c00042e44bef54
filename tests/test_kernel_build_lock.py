"""A kernel build killed mid-way must not make later starts wait forever.

The killed builder is a real process: it takes Tessera's build lock and torch's baton, as
``cpp_extension.load`` does while compiling, and is then killed with SIGKILL.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import tessera.model.kernels.build as kb
from tessera.model.kernels.build_lock import TORCH_BATON_NAME, BuildLockTimeout, build_lock

pytestmark = pytest.mark.skipif(os.name != "posix", reason="flock and SIGKILL are POSIX")

# Generous bounds for a loaded machine; without the fix these waits never end at all.
PROMPT_S = 20.0
CHILD_START_S = 120.0

_HOLDER = """
import sys
from pathlib import Path
from torch.utils.file_baton import FileBaton
from tessera.model.kernels.build_lock import build_lock
build_dir = Path(sys.argv[1])
with build_lock(build_dir, 30.0):
    assert FileBaton(str(build_dir / "lock")).try_acquire()  # what load() does before compiling
    print("holding", flush=True)
    sys.stdin.read()  # until killed, or the test closes stdin
"""


def _start_holder(build_dir: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(build_dir)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # returns "" at once if the child dies instead
    assert line.strip() == "holding", "the holder process did not take the locks"
    return proc


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    build_dir = tmp_path / "ext" / "tessera_kernels_test"
    proc = _start_holder(build_dir)
    try:
        yield proc, build_dir
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=CHILD_START_S)


@pytest.mark.processes
def test_baton_of_a_killed_builder_is_cleared(holder: tuple[subprocess.Popen[str], Path],
                                              caplog: pytest.LogCaptureFixture) -> None:
    proc, build_dir = holder
    proc.kill()  # SIGKILL: no cleanup runs, torch's baton stays behind
    proc.wait(timeout=CHILD_START_S)
    baton = build_dir / TORCH_BATON_NAME
    assert baton.exists()
    start_s = time.monotonic()
    with caplog.at_level(logging.WARNING), build_lock(build_dir, timeout_s=PROMPT_S):
        assert not baton.exists()
    assert time.monotonic() - start_s < PROMPT_S
    assert f"pid {proc.pid}" in caplog.text


@pytest.mark.processes
def test_a_live_builder_is_waited_for_with_a_bound(
        holder: tuple[subprocess.Popen[str], Path]) -> None:
    proc, build_dir = holder
    start_s = time.monotonic()
    with pytest.raises(BuildLockTimeout, match=f"pid {proc.pid}"), build_lock(build_dir, 0.3):
        pass
    assert time.monotonic() - start_s < PROMPT_S
    assert (build_dir / TORCH_BATON_NAME).exists()  # a live builder's baton is left alone


_OLD_STYLE = """
import sys
from torch.utils.file_baton import FileBaton
assert FileBaton(sys.argv[1]).try_acquire()  # a builder that takes only torch's baton
print("holding", flush=True)
sys.stdin.read()
"""


@pytest.mark.processes
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="open files are seen in /proc")
def test_a_live_baton_outside_the_lock_is_kept(tmp_path: Path) -> None:
    build_dir = tmp_path / "ext" / "tessera_kernels_test"
    build_dir.mkdir(parents=True)
    baton = build_dir / TORCH_BATON_NAME
    proc = subprocess.Popen([sys.executable, "-c", _OLD_STYLE, str(baton)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
        with build_lock(build_dir, timeout_s=PROMPT_S):
            assert baton.exists()  # an older Tessera may be compiling: torch waits for it
    finally:
        proc.kill()
        proc.wait(timeout=CHILD_START_S)


def test_load_proceeds_past_a_stale_baton(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end through ``cpp_extension.load`` with a tiny source (about 2 s to build)."""
    source = tmp_path / "probe.cpp"
    source.write_text("int tessera_lock_probe() { return 1; }\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(kb, "_SOURCES", [source])
    kb._ensure_ninja_on_path()
    build_dir = kb._build_directory("tessera_lock_probe")
    (build_dir / TORCH_BATON_NAME).write_text("")  # as a killed builder leaves it
    kb._load_bounded("tessera_lock_probe", ["-O0"], [], timeout_s=CHILD_START_S)
    assert (build_dir / "tessera_lock_probe.so").exists()
    assert not (build_dir / TORCH_BATON_NAME).exists()


def test_a_stuck_build_gives_the_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    from torch.utils import cpp_extension

    release = threading.Event()

    def stuck_load(**kwargs: object) -> None:
        release.wait(CHILD_START_S)  # a build that does not finish while the test watches

    monkeypatch.setattr(cpp_extension, "load", stuck_load)
    monkeypatch.setattr(kb, "_state", {})  # restored afterwards: the real build stays usable
    monkeypatch.setenv("TESSERA_KERNEL_BUILD_TIMEOUT_S", "0.5")
    monkeypatch.delenv("TESSERA_DISABLE_KERNELS", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    try:
        start_s = time.monotonic()
        with caplog.at_level(logging.WARNING, logger=kb.__name__):
            assert kb.kernel_available() is False
        assert time.monotonic() - start_s < PROMPT_S
        assert "not built within" in caplog.text and "fallback" in caplog.text
    finally:
        release.set()
