"""Which models ``tessera serve`` serves, built once from the command line.

Three ways, which combine: a model directory as the first argument (named by
``--served-model-name`` or its directory's name), ``--model NAME=PATH`` (repeated), and
``--config FILE``, a TOML file with one table per model::

    [models.chat]
    path = "models/chat-7b"        # relative to the file's directory
    max_num_seqs = 64              # any engine option, by its config field name
    kv_cache_memory = 4294967296
    tool_call_parser = "hermes"    # this model's formats (default: the server's flags)
    reasoning_parser = "qwen3"

    [models.small]
    path = "models/small"

The command line's engine flags are every model's defaults; a model's table overrides them.
Each model gets an engine core process of its own; when several share the CPU and no thread
count is given, each core gets an equal share of the CPUs this process may use.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path
from typing import Any

from tessera.engine_args import check_engine_option, engine_config, engine_options_from_args
from tessera.serve.config import ServedModel

_Entry = tuple[str, str, tuple[str, ...], dict[str, Any]]
"""A model as given: name, directory, aliases, its own options (engine options, and the
``ServedModel`` fields below)."""

_MODEL_OPTIONS = ("tool_call_parser", "reasoning_parser")
"""Options of a ``[models.NAME]`` table that are the server's, not the engine's."""


def _from_flag(text: str) -> _Entry:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path:
        raise ValueError(f"--model takes NAME=PATH, got {text!r}")
    return name.strip(), path, (), {}


def _from_config_file(file: str) -> list[_Entry]:
    where = f"--config {file}"
    try:
        data = tomllib.loads(Path(file).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {where}: {getattr(e, 'strerror', None) or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{where}: {e}") from None
    unknown = sorted(set(data) - {"models"})
    if unknown:
        raise ValueError(f"{where}: unknown table or key {unknown[0]!r} (expected [models.NAME])")
    tables = data.get("models")
    if not isinstance(tables, dict) or not tables:
        raise ValueError(f"{where}: no [models.NAME] table")
    base = Path(file).parent
    entries: list[_Entry] = []
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ValueError(f"{where}: models.{name} must be a table")
        options = dict(table)
        path = options.pop("path", None)
        if not isinstance(path, str) or not path:
            raise ValueError(f"{where}: model {name!r} needs path = \"MODEL_DIRECTORY\"")
        for key, value in options.items():
            if key in _MODEL_OPTIONS:
                if not isinstance(value, str):
                    raise ValueError(f"{where}: model {name!r}: {key} must be a string")
                continue
            try:
                check_engine_option(key, value)
            except TypeError as e:
                raise ValueError(f"{where}: model {name!r}: {e}") from None
        # Relative to the file, so a config works from any working directory.
        entries.append((name, str(base / Path(path).expanduser()), (), options))
    return entries


def _default_num_threads(num_models: int) -> int:
    """Each core's equal share of the CPUs, so cores do not fight over them."""
    num_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (num_cpus or 1) // num_models)


def served_models_from_args(args: argparse.Namespace) -> tuple[ServedModel, ...]:
    """The models to serve, each with its engine config; ValueError (one line, naming the
    model) for a bad name, path or option."""
    entries: list[_Entry] = []
    if args.model is not None:
        # Without a chosen name the model is served under its directory's name (the path is
        # the operator's business) and still answers to the path as given.
        name = args.served_model_name or Path(args.model).resolve().name
        entries.append((name, args.model, () if args.served_model_name else (args.model,), {}))
    elif args.served_model_name is not None:
        raise ValueError("--served-model-name names the model directory given as the first "
                         "argument; name the others with --model NAME=PATH")
    entries += [_from_flag(text) for text in args.models or ()]
    if args.config_file is not None:
        entries += _from_config_file(args.config_file)
    if not entries:
        raise ValueError("no model to serve: give a model directory, --model NAME=PATH or "
                         "--config FILE")
    names = [name for name, *_ in entries]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"the model name {name!r} is given twice")
    defaults = engine_options_from_args(args)
    if len(entries) > 1 and defaults.get("num_threads") is None:
        defaults["num_threads"] = _default_num_threads(len(entries))
    models = []
    for name, path, aliases, options in entries:
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"model {name!r}: {path!r} is not a model directory (no config.json)")
        own = {k: options.pop(k) for k in _MODEL_OPTIONS if k in options}
        try:
            engine = engine_config(path, **(defaults | options))
            models.append(ServedModel(name, engine, aliases, **own))
        except (TypeError, ValueError) as e:
            raise ValueError(f"model {name!r}: {e}") from None
    return tuple(models)
