"""Command-line flags derived from the fields of a frozen config dataclass.

A field made with ``option(...)`` is an option: its default, type and help are written once,
on the field, and ``add_options`` turns it into an argparse flag (``--field-name`` unless the
field names another), ``options_from_args`` reads the parsed values back into the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, flag: str | None = None, repr: bool = True,
           choices: tuple[str, ...] | None = None) -> Any:
    """A config field that is also a command-line option. A boolean option whose default is
    True needs a ``flag`` that turns it off (``--no-...``)."""
    if default is True and flag is None:
        raise TypeError("a boolean option that defaults to True needs a --no-... flag")
    return dataclasses.field(
        default=default, repr=repr,
        metadata={"help": help, "flag": flag, "choices": choices},
    )


def option_names(cls: type) -> list[str]:
    """The names of ``cls``'s option fields."""
    return [f.name for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag_of(cls: type, name: str) -> str:
    """The command-line flag of field ``name`` of ``cls``."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return str(f.metadata.get("flag") or "--" + name.replace("_", "-"))
    raise KeyError(name)


def _scalar_type(hint: Any) -> type:
    """``int`` for ``int`` and ``int | None``; the one non-None member of a union."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(members) == 1:
            return _scalar_type(members[0])
        raise TypeError(f"an option must have one type, not {hint}")
    return hint if isinstance(hint, type) else str


def option_type(cls: type, name: str) -> type:
    """The type of option ``name`` of ``cls``: ``int`` for ``int`` and ``int | None``."""
    return _scalar_type(typing.get_type_hints(cls)[name])


def add_options(parser: argparse.ArgumentParser | Any, cls: type,
                only_given: bool = False, names: tuple[str, ...] | None = None) -> None:
    """Add a flag for every ``option`` field of ``cls`` (or those in ``names``) to ``parser``
    (or an argument group). With ``only_given`` a flag left out sets nothing
    (``options_from_args`` then leaves the field to the dataclass), so a caller can tell which
    options were given."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata or (names is not None and f.name not in names):
            continue
        kind = _scalar_type(hints[f.name])
        flag = flag_of(cls, f.name)
        default = argparse.SUPPRESS if only_given else f.default
        if kind is bool:
            action = "store_false" if f.default is True else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, default=default,
                                help=f.metadata["help"])
        else:
            shown = ("" if f.default is None or "default" in f.metadata["help"]
                     else f" (default {f.default})")
            choices = f.metadata.get("choices")
            metavar = None if choices else flag.lstrip("-").split("-")[-1].upper()
            parser.add_argument(
                flag, dest=f.name, type=kind, default=default, metavar=metavar,
                choices=choices, help=f.metadata["help"] + shown,
            )


def options_from_args(cls: type[T], args: argparse.Namespace, **others: Any) -> T:
    """An instance of ``cls`` from its options in ``args`` and the other fields given."""
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if "help" in f.metadata and hasattr(args, f.name)
    }
    return cls(**(values | others))
