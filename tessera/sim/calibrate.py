"""``tessera sim calibrate``: measure this machine, and Tessera on it, into a ``cpu-local`` profile.

Two parts. Raw rates (matmul TFLOPS per precision, memory bandwidth, per-op launch cost) are
measured with torch. With ``--model DIR`` the engine itself is then run on a fixed set of
calibration workloads (:mod:`tessera.sim.engine_probe`), and the cost model's efficiency
constants are fitted to its measured steps (:mod:`tessera.sim.fit`), so that the simulator
predicts Tessera's own runs here (``benchmarks/sim_local.py`` checks it on other workloads).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import OneLineArgumentParser, SimError
from .gauge import MachineGauge, best_s, engine_linear
from .hardware import default_profile_path


def measure(size: int = 1024, repeats: int = 3) -> dict[str, object]:
    """Measure matmul TFLOPS per dtype and memory GB/s on this machine (torch, CPU).

    The profile also keeps the :class:`~tessera.sim.gauge.MachineGauge` reading of the moment
    (``gauge``, the mean of one just before and one just after): the rates hold at that machine
    speed, and :func:`tessera.sim.gauge.system_at` rates them at another."""
    import torch

    gauge = MachineGauge()
    before = gauge.read()
    tflops: dict[str, float] = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        secs = best_s(engine_linear(a, b), 2 * repeats)
        tflops[name] = 2.0 * size**3 / secs / 1e12
    # Weight streaming, the memory traffic of a decode step, is measured as what it is: a
    # one-row matmul over a weight matrix far larger than the caches. On a CPU it reads faster
    # than a tensor copy moves bytes (no write-allocate traffic, prefetch runs ahead), so a
    # copy-based rate would push the fitted memory efficiency above 1. Server CPUs have last-
    # level caches of hundreds of MiB (480 MiB on the benchmark machine), and a 128 MiB matrix
    # streamed from there read 42 GB/s against 24 from memory, so the matrix is 1 GiB.
    weight = torch.ones(8192, 32768, dtype=torch.float32)  # 1 GiB
    row = torch.ones(1, 32768, dtype=torch.float32)
    secs = best_s(engine_linear(row, weight), 3 * repeats)  # ~40 ms each
    mem_gb_s = weight.numel() * 4 / secs / 1e9
    del weight
    src = torch.empty(64 * 1024 * 1024 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    copy_gb_s = 2.0 * src.numel() * 4 / best_s(lambda: dst.copy_(src), repeats) / 1e9
    launch_s = best_s(lambda: torch.add(src[:16], 1.0), 50)
    after = gauge.read()
    try:
        import os

        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem_gb = pages / 1e9
    except (ValueError, OSError, AttributeError):
        mem_gb = 16.0
    return {
        "tflops": {"fp32": tflops["fp32"], "bf16": tflops["bf16"], "fp8": tflops["bf16"],
                   "int8": tflops["bf16"]},
        "memory_gb": mem_gb,
        "memory_gb_s": mem_gb_s,
        "copy_gb_s": copy_gb_s,
        "gauge": [(before[0] + after[0]) / 2.0, (before[1] + after[1]) / 2.0],
        "efficiency": {"matmul": 1.0, "attention": 0.5, "memory": 1.0, "fabric": 1.0,
                       "op_overhead_us": launch_s * 1e6, "ops_per_layer": 14,
                       "step_overhead_ms": 1.0},
        "source": "measured by tessera sim calibrate (torch on CPU); rates already effective",
    }


_PRECISION = {"float32": "fp32", "bfloat16": "bf16"}


def calibrate_engine(profile: dict[str, Any], model_dir: str, dtype: str = "float32",
                     num_threads: int | None = None) -> dict[str, Any]:
    """Run Tessera on ``model_dir`` and return ``profile`` with fitted efficiency constants."""
    from tessera.config import EngineConfig
    from tessera.engine.llm_engine import LLMEngine
    from tessera.model.loader import ModelLoadError, read_config

    from .engine_probe import CALIBRATION_RUNS, calibration_samples, with_engine_facts
    from .fit import fit_efficiency, profile_with, step_errors
    from .hardware import system_from_profile
    from .model import spec_from_config

    if dtype not in _PRECISION:
        raise SimError(f"--dtype must be one of {', '.join(_PRECISION)}")
    try:
        model = spec_from_config(read_config(model_dir), name=model_dir)
        engine = LLMEngine(EngineConfig(model=model_dir, dtype=dtype, num_threads=num_threads))
    except (ModelLoadError, ValueError) as exc:
        raise SimError(f"cannot load {model_dir!r}: {exc}") from exc
    longest = max(prompt + output for _, prompt, output in CALIBRATION_RUNS)
    if engine.runtime.max_model_len < longest:
        raise SimError(f"{model_dir!r} holds {engine.runtime.max_model_len} tokens of context; "
                       f"the calibration workloads need {longest} (a prompt of "
                       f"{longest - 2} split in chunks): calibrate on a model with a longer "
                       "max_position_embeddings")
    engine.warm_up()
    cache = engine.runner.kv_caches[0]
    assert cache is not None
    kv_bytes = float(cache.element_size())
    samples = calibration_samples(engine, model, kv_bytes)
    precision = _PRECISION[dtype]
    profile = with_engine_facts(profile, engine)
    system = system_from_profile(profile)
    eff = fit_efficiency(system, model, precision, samples)
    fitted = profile_with(profile, eff)
    errors = sorted(abs(e) for e in step_errors(system_from_profile(fitted), model, precision,
                                                samples))
    fitted["engine_fit"] = {
        "model": str(model_dir), "dtype": dtype, "num_threads": num_threads,
        "num_steps": len(samples), "median_abs_step_error": errors[len(errors) // 2],
    }
    return fitted


MAX_MATMUL_SIZE = 8192
"""Largest ``--size``: two fp32 matrices of 8192^2 take 512 MiB and a second per product on a
laptop core; a larger size is a typo that would exhaust memory or run for hours."""


def calibrate_main(argv: list[str]) -> int:
    """Write the local profile (``--out`` or the default profile path)."""
    from .inputs import check_output_file, int_arg

    p = OneLineArgumentParser(prog="tessera sim calibrate")
    p.add_argument("--out", help="profile path (default: ~/.cache/tessera/cpu-local.json)")
    p.add_argument("--size", type=int_arg(16, MAX_MATMUL_SIZE), default=1024, help="matmul size")
    p.add_argument("--model", help="HF model directory: also run Tessera on it and fit the "
                   "cost model's efficiency constants to its measured steps")
    p.add_argument("--dtype", default="float32", choices=sorted(_PRECISION),
                   help="engine dtype for --model")
    p.add_argument("--threads", type=int_arg(1), default=None, help="engine threads for --model")
    args = p.parse_args(argv)
    # Measuring takes seconds and --model minutes: check where the profile goes and what
    # --model names first.
    path = Path(args.out) if args.out is not None else default_profile_path()
    # The default's directory is created on first use; a given --out must name an existing one
    # (a mistyped directory is an error, not a new tree).
    check_output_file(str(path), "--out" if args.out is not None else "the profile path",
                      make_parents=args.out is None)
    if args.model is not None:
        _check_model_dir(args.model)
    profile = measure(args.size)
    if args.model:
        profile = calibrate_engine(profile, args.model, args.dtype, args.threads)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # only the default's can be missing
        path.write_text(json.dumps(profile, indent=2))
    except OSError as exc:
        raise SimError(f"cannot write the profile to {path}: {exc.strerror or exc}") from exc
    print(json.dumps(profile))
    print(f"profile written to {path}")
    return 0


def _check_model_dir(model_dir: str) -> None:
    # Only the path: loading the config pulls in torch and the model loader, which the engine
    # run does anyway and reports in full.
    path = Path(model_dir)
    if not path.is_dir():
        raise SimError(f"--model: model directory {model_dir!r} does not exist")
    if not (path / "config.json").is_file():
        raise SimError(f"--model: {model_dir!r} has no config.json; is it a Hugging Face model?")
