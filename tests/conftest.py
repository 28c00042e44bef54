"""Shared fixtures, the ``--device`` option and the test tiers' markers.

Tiers (markers registered in pyproject.toml, ``--strict-markers``):

* ``processes``: the test starts a Python child process (server, engine core, AFD workers,
  Ray, a CLI run). A test that starts one without the marker fails at teardown, so
  ``make test-unit`` (``-m "not processes and not slow"``) stays in-process.
* ``ray``: the test uses Ray (implies ``processes``).
* ``slow``: the test takes more than about 10 s on a 2-core machine.

``--device cuda`` (or ``TESSERA_TEST_DEVICE=cuda``) runs only the tests that take the ``device``
fixture, on that device; every other test is CPU-only and is deselected.
"""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.models import build_model

torch.set_num_threads(2)

DEVICE_ENV = "TESSERA_TEST_DEVICE"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default=os.environ.get(DEVICE_ENV, "").strip() or "cpu",
        help=f"device for the tests that take the `device` fixture: cpu (default), cuda or"
        f" cuda:N (default from ${DEVICE_ENV}); with a non-CPU device only those tests run",
    )


def pytest_configure(config: pytest.Config) -> None:
    device = config.getoption("--device")
    if device != "cpu" and not device.startswith("cuda"):
        raise pytest.UsageError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {device}: torch.cuda is not available here")
    _install_process_watch()


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    """The device engines and tensors of device-agnostic tests are built on (``--device``)."""
    return str(request.config.getoption("--device"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("ray") and not item.get_closest_marker("processes"):
            item.add_marker(pytest.mark.processes)
    if config.getoption("--device") == "cpu":
        return
    keep = [item for item in items if "device" in getattr(item, "fixturenames", ())]
    dropped = [item for item in items if "device" not in getattr(item, "fixturenames", ())]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """Build each random model once per test session: name -> (dir, HF reference model)."""
    cache: dict = {}

    def get(name: str, **overrides):
        key = (name, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(name)
            cache[key] = build_model(name, out, **overrides)
        return cache[key]

    return get


# --- the `processes` marker, checked: a test that starts a Python process must carry it ---

_watch_lock = threading.Lock()
_watched: dict[str, Any] = {"item": None, "started": []}


def _is_python(argv0: str) -> bool:
    name = os.path.basename(argv0)
    if name.startswith("python"):
        return True
    try:
        return os.path.realpath(argv0) == os.path.realpath(sys.executable)
    except (OSError, ValueError):
        return False


def _note(what: str) -> None:
    with _watch_lock:
        if _watched["item"] is not None:
            _watched["started"].append(what)


def _install_process_watch() -> None:
    """Wrap ``subprocess.Popen`` (also under asyncio and Ray) and ``multiprocessing``'s
    ``Process.start`` to note, per test, every Python child started."""
    if getattr(subprocess.Popen, "_tessera_watched", False):
        return
    popen_init = subprocess.Popen.__init__
    process_start = multiprocessing.process.BaseProcess.start

    def watched_init(self: subprocess.Popen, args: Any, *rest: Any, **kwargs: Any) -> None:
        popen_init(self, args, *rest, **kwargs)
        argv0 = kwargs.get("executable") or (args if isinstance(args, (str, bytes, os.PathLike))
                                             else next(iter(args), ""))
        argv0 = os.fsdecode(argv0)
        if not kwargs.get("shell") and _is_python(argv0):
            _note(f"subprocess {argv0} (pid {self.pid})")

    def watched_start(self: multiprocessing.process.BaseProcess) -> None:
        process_start(self)
        _note(f"multiprocessing {self.name} (pid {self.pid})")

    subprocess.Popen.__init__ = watched_init  # type: ignore[method-assign]
    subprocess.Popen._tessera_watched = True  # type: ignore[attr-defined]
    multiprocessing.process.BaseProcess.start = watched_start  # type: ignore[method-assign]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    with _watch_lock:
        _watched["item"] = item
        _watched["started"] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    try:
        result = yield
    finally:
        with _watch_lock:
            started, _watched["item"], _watched["started"] = _watched["started"], None, []
    if started and item.get_closest_marker("processes") is None:
        pytest.fail(
            f"{item.nodeid} started {len(started)} Python process(es), the first {started[0]},"
            " but is not marked `processes`: add @pytest.mark.processes (or a `pytestmark`),"
            " so that `make test-unit` keeps to in-process tests",
            pytrace=False,
        )
    return result
