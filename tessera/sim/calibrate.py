"""``tessera sim calibrate``: measure this machine, and Tessera on it, into a ``cpu-local`` profile.

Two parts. Raw rates (matmul TFLOPS per precision, memory bandwidth, per-op launch cost) are
measured with torch. With ``--model DIR`` the engine itself is then run on a fixed set of
calibration workloads (:mod:`tessera.sim.engine_probe`), and the cost model's constants are
fitted to its measured steps (:mod:`tessera.sim.fit`), so that the simulator predicts Tessera's
own runs here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .errors import OneLineArgumentParser, SimError
from .hardware import BYTES_PER_ELEMENT, HostCosts, default_profile_path


def best_s(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls of ``fn`` (others on the machine only slow it)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def engine_linear(x: Any, weight: Any) -> Callable[[], object]:
    """x [n, K] times weight [N, K]^T as the engine's linears run it: through the packed path
    (``kernels/linear.py``) where a float32 weight is packed, else a plain matmul. The measured
    rates are what the fitted efficiencies are fractions of, so they are the engine's own."""
    import torch

    from tessera.model.kernels.linear import can_pack, pack_weight, packed_linear

    if can_pack(weight):
        packed = pack_weight(weight)
        return lambda: packed_linear(x, weight, packed, 1)
    return lambda: torch.mm(x, weight.t())


class MachineGauge:
    """Reads this machine's speed in ~50 ms: a 512-square engine linear (fp32 GFLOP/s) and a
    one-row matmul over a 256 MiB weight (weight-streaming GB/s; far larger than a desktop or
    small-server last-level cache, though not than the largest ones). The same operations as
    :func:`measure`, smaller: the profile keeps the reading at which its rates hold
    (``Chip.gauge``)."""

    def __init__(self) -> None:
        import torch

        size = 512
        self._mm = engine_linear(torch.randn(size, size), torch.randn(size, size))
        self._flops = 2.0 * size**3
        weight = torch.ones(2048, 32768, dtype=torch.float32)  # 256 MiB
        self._stream = engine_linear(torch.ones(1, 32768), weight)
        self._bytes = weight.numel() * 4

    def read(self) -> tuple[float, float]:
        """(fp32 GFLOP/s, weight-streaming GB/s), each the best of a few tries."""
        return (self._flops / best_s(self._mm, 5) / 1e9,
                self._bytes / best_s(self._stream, 3) / 1e9)


def measure(size: int = 1024, repeats: int = 3) -> dict[str, object]:
    """Measure matmul TFLOPS per dtype and memory GB/s on this machine (torch, CPU).

    The profile also keeps the :class:`MachineGauge` reading of the moment (``gauge``, the mean
    of one just before and one just after): the rates hold at that machine speed, and
    :func:`tessera.sim.hardware.system_at` rates them at another. Its host costs are none until
    an engine is fitted (:func:`calibrate_engine`)."""
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
    # level caches of hundreds of MiB, so the matrix is 1 GiB.
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
        "host": asdict(HostCosts()),
        "source": "measured by tessera sim calibrate (torch on CPU); rates already effective",
    }


_PRECISION = {"float32": "fp32", "bfloat16": "bf16"}


def calibrate_engine(profile: dict[str, Any], model_dir: str, dtype: str = "float32",
                     num_threads: int | None = None) -> dict[str, Any]:
    """Run Tessera on ``model_dir`` (on the CPU, whose rates ``profile`` holds) and return
    ``profile`` with its constants fitted to the engine's steps."""
    from tessera.config import EngineConfig
    from tessera.engine.llm_engine import LLMEngine
    from tessera.model.loader import ModelLoadError, read_config

    from .engine_probe import CALIBRATION_RUNS, calibration_samples, with_engine_facts
    from .fit import fit_system, profile_with, step_errors
    from .hardware import system_from_profile
    from .model import costs_from_config

    if dtype not in _PRECISION:
        raise SimError(f"--dtype must be one of {', '.join(_PRECISION)}")
    try:
        model = costs_from_config(read_config(model_dir), name=model_dir)
        engine = LLMEngine(EngineConfig(model=model_dir, dtype=dtype, device="cpu",
                                        num_threads=num_threads))
    except (ModelLoadError, ValueError) as exc:
        raise SimError(f"cannot load {model_dir!r}: {exc}") from exc
    longest = max(prompt + output for _, prompt, output in CALIBRATION_RUNS)
    if engine.runtime.max_model_len < longest:
        raise SimError(f"{model_dir!r} holds {engine.runtime.max_model_len} tokens of context; "
                       f"the calibration workloads need {longest} (a prompt of "
                       f"{longest - 2} split in chunks): calibrate on a model with a longer "
                       "max_position_embeddings")
    engine.warm_up()
    precision = _PRECISION[dtype]
    kv_bytes = BYTES_PER_ELEMENT[precision]  # the KV cache takes the engine's dtype
    samples = calibration_samples(engine, model, kv_bytes)
    profile = with_engine_facts(profile, engine)
    fitted = profile_with(profile, fit_system(system_from_profile(profile), model, precision,
                                              samples))
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
    p.add_argument("--threads", type=int_arg(1), default=None,
                   help="threads of one engine: the profile's rates are then those of one "
                   "device of that many threads, and the host's cores make several devices "
                   "(data-parallel or prefill/decode instances in 'tessera plan')")
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
    if args.threads is not None:
        import torch

        # The raw rates then hold for one engine of that many threads: a device of the
        # local system (``threads_per_device``), of which the host's cores make several.
        torch.set_num_threads(args.threads)
    profile = measure(args.size)
    if args.threads is not None:
        profile["threads_per_device"] = args.threads
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
