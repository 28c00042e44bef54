"""Engine options, derived from the config dataclasses: keyword arguments (``LLM``) and
command-line flags (``tessera generate``, ``tessera serve``).

Every option is a field of ``EngineConfig``, ``SchedulerConfig``, ``CacheConfig`` or
``AFDConfig``, with its default and help written there once (``tessera.cli_options``);
option names are unique across the four, so a flat list of keywords says which config each
belongs to.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from tessera.cli_options import add_options, flag_of, option_names, option_type
from tessera.config import AFDConfig, CacheConfig, ClusterConfig, EngineConfig, SchedulerConfig

_NESTED = {"scheduler": SchedulerConfig, "cache": CacheConfig, "afd": AFDConfig,
           "cluster": ClusterConfig}
_ENGINE_FIELDS = [f.name for f in dataclasses.fields(EngineConfig)
                  if f.name != "model" and f.name not in _NESTED]
_OWNER: dict[str, type] = {}
for _cls, _names in ((EngineConfig, _ENGINE_FIELDS),
                     *((c, [f.name for f in dataclasses.fields(c)]) for c in _NESTED.values())):
    for _name in _names:
        assert _name not in _OWNER, f"option {_name} is defined twice"
        _OWNER[_name] = _cls
_AFD_SWITCHES = ("attention_workers", "ffn_workers")


def engine_option_names() -> list[str]:
    """Every keyword ``engine_config`` (and so ``LLM``) accepts."""
    return list(_OWNER)


def check_engine_option(name: str, value: Any) -> None:
    """TypeError naming ``name`` unless it is an engine option and ``value`` has its type (an
    integer is also a float; a boolean is not a number). Ranges are the configs' to check."""
    if name not in _OWNER:
        raise TypeError(f"unknown engine option {name!r}")
    kind = option_type(_OWNER[name], name)
    if kind is bool or isinstance(value, bool):
        ok = kind is bool and isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise TypeError(f"engine option {name!r} must be of type {kind.__name__}, got {value!r}")


def _default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(_OWNER[name]) if f.name == name)


def with_deployment(options: dict[str, Any], path: str) -> dict[str, Any]:
    """``options`` with those of the deployment file at ``path`` (``tessera.deployment_file``).

    An option the file sets may also be given with the file's value or its default; another
    value is a ValueError naming both, since running some other shape than the file's would
    measure something else than was planned."""
    from tessera import deployment_file

    planned = deployment_file.engine_options(deployment_file.read(path),
                                             deployment_file.host_cpus())
    for name, value in planned.items():
        given = options.get(name, _default(name))
        if given != value and given != _default(name):
            raise ValueError(f"the deployment file sets {name} = {value!r}; the option given "
                             f"as {given!r} contradicts it (drop it or edit the file)")
    return {**options, **planned}


def engine_config(model: str, afd: AFDConfig | None = None, deployment: str | None = None,
                  **options: Any) -> EngineConfig:
    """The engine config of ``model`` with ``options`` named like the config fields.

    Attention/FFN disaggregation is on when ``afd`` is given or ``attention_workers`` or
    ``ffn_workers`` is; its other options need one of them. ``deployment`` is the path of a
    deployment file (``tessera plan --emit-deployment``) whose pools and limits are taken
    (:func:`with_deployment`). TypeError for an unknown option; ValueError for a bad value
    (a bad deployment file included)."""
    if deployment is not None:
        options = with_deployment(options, deployment)
    unknown = sorted(set(options) - set(_OWNER))
    if unknown:
        raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
    by_owner: dict[type, dict[str, Any]] = {cls: {} for cls in (EngineConfig, *_NESTED.values())}
    for name, value in options.items():
        by_owner[_OWNER[name]][name] = value
    afd_options = by_owner[AFDConfig]
    if afd_options:
        if afd is not None:
            raise ValueError("give AFD options either as afd=AFDConfig(...) or as keywords")
        if not any(name in afd_options for name in _AFD_SWITCHES):
            given = ", ".join(sorted(afd_options))
            raise ValueError(f"{given} needs attention_workers and ffn_workers")
        afd = AFDConfig(**afd_options)
    cluster_options = by_owner[ClusterConfig]
    cluster = None
    if cluster_options:
        if not {"data_parallel", "prefill_instances", "decode_instances"} & set(cluster_options):
            given = ", ".join(sorted(cluster_options))
            raise ValueError(f"{given} needs data_parallel or prefill_instances and "
                             "decode_instances")
        checked = ClusterConfig(**cluster_options)  # bad values fail even with one instance
        cluster = checked if checked.enabled else None
    return EngineConfig(
        model=model,
        scheduler=SchedulerConfig(**by_owner[SchedulerConfig]),
        cache=CacheConfig(**by_owner[CacheConfig]),
        afd=afd,
        cluster=cluster,
        **by_owner[EngineConfig],
    )


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Add the engine's options to a command's parser."""
    for cls in (EngineConfig, SchedulerConfig, CacheConfig):
        add_options(p, cls)
    afd = p.add_argument_group(
        "attention/FFN disaggregation (on when --attention-workers or --ffn-workers is given)")
    add_options(afd, AFDConfig, only_given=True)
    cluster = p.add_argument_group(
        "instances behind a router (on with --data-parallel over 1, or --prefill-instances "
        "and --decode-instances)")
    add_options(cluster, ClusterConfig, only_given=True)
    p.add_argument("--deployment", default=None, metavar="FILE",
                   help="run the deployment in FILE, written by 'tessera plan "
                   "--emit-deployment' (its pools, instances and batch limits)")


def engine_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options of parsed flags, as ``engine_config`` keywords (AFD's only where
    given); a bad combination raises ValueError naming the flags."""
    options = {name: getattr(args, name) for cls in (EngineConfig, *_NESTED.values())
               for name in option_names(cls) if hasattr(args, name)}
    if getattr(args, "deployment", None) is not None:
        options = with_deployment(options, args.deployment)
    afd_given = [name for name in option_names(AFDConfig) if name in options]
    if afd_given and not any(name in options for name in _AFD_SWITCHES):
        flags = ", ".join(flag_of(AFDConfig, name) for name in afd_given)
        raise ValueError(f"{flags} needs --attention-workers and --ffn-workers")
    cluster_given = [name for name in option_names(ClusterConfig) if name in options]
    switches = ("data_parallel", "prefill_instances", "decode_instances")
    if cluster_given and not any(name in options for name in switches):
        flags = ", ".join(flag_of(ClusterConfig, name) for name in cluster_given)
        raise ValueError(f"{flags} needs --data-parallel or --prefill-instances and "
                         "--decode-instances")
    return options


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Build the frozen engine config from parsed options; bad values raise ValueError."""
    return engine_config(str(args.model), **engine_options_from_args(args))
