"""Checks of user-supplied values, shared by the command lines and the Python API.

Every check runs before any simulation, search or calibration starts, so a bad value costs the
user a one-line error at once rather than a traceback (or a wasted run) minutes later. The
same rules back the argparse types (:func:`int_arg`, :func:`float_arg`) and the dataclass
checks (:func:`check_int`, :func:`check_float`), so a flag and its API field agree.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import numbers
import os
from collections.abc import Callable
from pathlib import Path

from .errors import SimError

MAX_REQUESTS = 10_000_000
"""Most requests one simulation takes: each is a row in several int64 arrays, and 100k take
about 15 s, so more than this is a typo rather than a study (and could exhaust memory)."""

MAX_BATCH_PER_DP = 65_536
"""Most sequences one data-parallel group decodes at once: the decode slots are allocated up
front for every group, so an absurd batch would exhaust memory before the KV check runs."""


def _int_problem(value: int, minimum: int, maximum: int | None) -> str | None:
    if value < minimum:
        return f"must be at least {minimum} (got {value})"
    if maximum is not None and value > maximum:
        return f"must be at most {maximum} (got {value})"
    return None


def _float_problem(value: float, minimum: float | None, maximum: float | None,
                   min_open: bool, max_open: bool) -> str | None:
    if not math.isfinite(value):
        return f"must be a finite number (got {value})"
    if minimum is not None and (value <= minimum if min_open else value < minimum):
        return f"must be {'above' if min_open else 'at least'} {minimum:g} (got {value:g})"
    if maximum is not None and (value >= maximum if max_open else value > maximum):
        return f"must be {'below' if max_open else 'at most'} {maximum:g} (got {value:g})"
    return None


def check_int(name: str, value: object, minimum: int = 1, maximum: int | None = None) -> int:
    """Return ``value`` if it is an integer in ``[minimum, maximum]``; else raise SimError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SimError(f"{name} must be an integer (got {value!r})")
    problem = _int_problem(int(value), minimum, maximum)
    if problem:
        raise SimError(f"{name} {problem}")
    return int(value)


def check_float(name: str, value: object, minimum: float | None = None,
                maximum: float | None = None, *, min_open: bool = False,
                max_open: bool = False) -> float:
    """Return ``value`` if it is a finite real in the range; else raise SimError.

    ``min_open`` / ``max_open`` exclude the bound itself (a rate must be above 0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SimError(f"{name} must be a number (got {value!r})")
    problem = _float_problem(float(value), minimum, maximum, min_open, max_open)
    if problem:
        raise SimError(f"{name} {problem}")
    return float(value)


def int_arg(minimum: int = 1, maximum: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in ``[minimum, maximum]`` (counts and sizes: at least 1)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        problem = _int_problem(value, minimum, maximum)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse


def float_arg(minimum: float | None = None, maximum: float | None = None, *,
              min_open: bool = False, max_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in the range (nan and inf are never meaningful here)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        problem = _float_problem(value, minimum, maximum, min_open, max_open)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = "number"
    return parse


def check_output_file(path: str, flag: str, make_parents: bool = False) -> None:
    """Raise SimError unless ``path`` can be written as a file.

    Without ``make_parents`` its directory must exist; with it, the nearest existing ancestor
    must be a writable directory (the writer creates the rest)."""
    if not path:
        raise SimError(f"{flag} needs a file name")
    target = Path(path)
    if target.is_dir():
        raise SimError(f"{flag} {path} is a directory, not a file")
    if target.exists():
        if not os.access(target, os.W_OK):
            raise SimError(f"{flag} {path} is not writable")
        return
    parent = target.parent
    if make_parents:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    elif not parent.exists():
        raise SimError(f"{flag} {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise SimError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SimError(f"{flag} {path}: directory {parent} is not writable")


def require_module(module: str, flag: str, extra: str) -> None:
    """Raise SimError naming the pip extra when optional ``module`` (needed by ``flag``) is absent."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        found = False
    if not found:
        raise SimError(f"{flag} needs {module}, which is not installed:"
                       f" pip install 'tessera[{extra}]'")
