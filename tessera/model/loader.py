"""Load a Hugging Face model directory (config.json + safetensors) into a ``DecoderModel``.

Checkpoint tensors are mapped onto the model's (possibly fused) parameters row by row; every
parameter must be covered exactly once and every tensor must be known, so a missing, extra or
mis-shaped tensor is reported by name instead of producing a silently wrong model.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from tessera.model.dense import DecoderModel
from tessera.model.moe_spec import MoESpec, moe_spec_from_config
from tessera.model.registry import model_class
from tessera.model.spec import ModelConfigError, ModelSpec, spec_from_config
from tessera.model.weights import Target

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


class ModelLoadError(ValueError):
    """The model directory cannot be loaded; the message names the problem."""


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{str(path)!r} has no config.json; is it a Hugging Face model?")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"config.json in {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"config.json in {str(path)!r} is not a JSON object")
    return cfg


def resolve_dtype(name: str, spec: ModelSpec) -> torch.dtype:
    if name == "auto":
        return _DTYPES.get(str(spec.checkpoint_dtype), torch.float32)
    return _DTYPES[name]


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index.name} is malformed: {e}") from e
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{index.name} names {f.name!r}, which is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors files in {str(path)!r}")
    return files


def load_model(
    model_dir: str | Path, dtype: str, device: torch.device,
    expert_ids: Sequence[int] | None = None,
    keep: Callable[[str], bool] | None = None,
) -> tuple[ModelSpec, DecoderModel]:
    """Build the model for ``model_dir`` on ``device`` and load its weights.

    ``expert_ids`` (MoE families only) loads just those routed experts of every MoE layer
    (an empty list: none, for a worker that only routes); the rest are never read.
    ``keep(param_name)`` false leaves that parameter empty (never allocated nor read): a
    process that runs only some units loads only their weights."""
    path = Path(model_dir)
    cfg = read_config(path)
    try:
        spec = spec_from_config(cfg)
        cls = model_class(spec)
        torch_dtype = resolve_dtype(dtype, spec)
        with torch.device("meta"):
            # MoE families check their MoE fields here.
            model = (cls(spec) if expert_ids is None else _with_experts(cls, spec, expert_ids))
            model = model.to(torch_dtype)
    except ModelConfigError as e:
        raise ModelLoadError(str(e)) from e
    dropped = _drop_params(model, keep) if keep is not None else set()
    model.to_empty(device=device)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    load_weights(model, spec, _safetensors_files(path), dropped)
    model.rotary.build_tables(device)
    model.eval()
    return spec, model


def model_spec(model_dir: str | Path) -> ModelSpec:
    """The shape of a model directory's model, without loading weights."""
    try:
        return spec_from_config(read_config(model_dir))
    except ModelConfigError as e:
        raise ModelLoadError(str(e)) from e


def moe_spec_of(model_dir: str | Path) -> MoESpec | None:
    """The MoE shape of a model directory; None for a dense model."""
    try:
        return moe_spec_from_config(read_config(model_dir))
    except ModelConfigError as e:
        raise ModelLoadError(str(e)) from e


def _with_experts(
    cls: type[DecoderModel], spec: ModelSpec, expert_ids: Sequence[int]
) -> DecoderModel:
    if "expert_ids" not in inspect.signature(cls).parameters:
        raise ModelConfigError(f"{spec.architecture} has no experts to place")
    return cls(spec, expert_ids=expert_ids)  # type: ignore[call-arg]


def _drop_params(model: DecoderModel, keep: Callable[[str], bool]) -> set[str]:
    """Replace the parameters ``keep`` rejects with empty ones; returns their names."""
    dropped = set()
    for name, param in list(model.named_parameters()):
        if not keep(name):
            owner, _, attr = name.rpartition(".")
            empty = torch.empty(0, dtype=param.dtype, device=param.device)
            setattr(model.get_submodule(owner), attr, nn.Parameter(empty, requires_grad=False))
            dropped.add(name)
    return dropped


def load_weights(
    model: DecoderModel, spec: ModelSpec, files: list[Path], dropped: set[str] | None = None
) -> None:
    """Fill every parameter from the checkpoint; tensors of ``dropped`` parameters are
    skipped unread."""
    dropped = dropped or set()
    params = {k: v for k, v in model.named_parameters() if k not in dropped}
    # Counted in elements so stacked expert parameters are checked like row-fused ones.
    elems_loaded = dict.fromkeys(params, 0)
    with torch.no_grad():
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise ModelLoadError(f"cannot read {file.name}: {e}") from e
            with handle as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if _IGNORED.search(name):
                        continue
                    target = model.checkpoint_target(name)
                    if target is not None and target.skip:
                        continue
                    if target is None:
                        if name == "lm_head.weight" and spec.tie_word_embeddings:
                            continue
                        raise ModelLoadError(f"unexpected tensor {name!r} in {file.name}")
                    if target.param in dropped:
                        continue
                    if target.param not in params:
                        if target.param == "lm_head.weight" and spec.tie_word_embeddings:
                            continue
                        raise ModelLoadError(f"unexpected tensor {name!r} in {file.name}")
                    tensor = f.get_tensor(name)
                    param = params[target.param]
                    want, dest = target_slice(param, target)
                    if tuple(tensor.shape) != want:
                        raise ModelLoadError(
                            f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {want}"
                        )
                    if target.source_experts is not None:
                        tensor = tensor[list(target.source_experts)]
                    dest.copy_(tensor)
                    elems_loaded[target.param] += dest.numel()
    for name, param in params.items():
        if elems_loaded[name] != param.numel():
            what = "missing" if elems_loaded[name] == 0 else "partly missing or duplicated"
            raise ModelLoadError(f"checkpoint tensor for parameter {name!r} is {what}")


def target_slice(param: torch.Tensor, t: Target) -> tuple[tuple[int, ...], torch.Tensor]:
    """The checkpoint shape target ``t`` expects and the slice of ``param`` it fills."""
    rows = slice(t.row_offset, t.row_offset + t.num_rows)
    if t.source_experts is not None:  # all experts stacked: [E, rows, C] -> param[:, rows]
        return (t.num_source_experts, t.num_rows, *param.shape[2:]), param[:, rows]
    if t.expert is not None:  # one expert: [rows, C] -> param[expert, rows]
        return (t.num_rows, *param.shape[2:]), param[t.expert, rows]
    return (t.num_rows, *param.shape[1:]), param[rows]


__all__ = ["ModelLoadError", "Target", "load_model", "read_config", "resolve_dtype", "target_slice"]
