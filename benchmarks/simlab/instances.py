"""The simulator's prediction of a run of Tessera instances on this machine, for benchmarks that
set it beside what they measure (``benchmarks/disaggregation.py --predict``).

The profiles are calibrated on the benchmark's own model (``tessera sim calibrate --threads T
--model DIR``): one with one engine thread per device for instances of one thread, one with two
for the colocated engine. Each is kept under ``.bench/sim`` and reused until
``--recalibrate``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILE_DIR = REPO_ROOT / ".bench" / "sim"


def calibrated_profile(model_dir: str, threads: int, recalibrate: bool = False) -> Path:
    """A profile of this machine at ``threads`` engine threads, fitted on ``model_dir``."""
    path = PROFILE_DIR / f"cpu-local-{Path(model_dir).name}-{threads}t.json"
    if path.is_file() and not recalibrate:
        return path
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    print(f"  calibrating the simulator at {threads} thread(s) (minutes) ...", flush=True)
    subprocess.run([sys.executable, "-m", "tessera.cli", "sim", "calibrate", "--threads",
                    str(threads), "--model", model_dir, "--out", str(path)],
                   check=True, stdout=subprocess.DEVNULL)
    return path


def predict(profile: Path, model_dir: str, prompts: list[int], outputs: list[int],
            arrival_s: list[float], max_num_batched_tokens: int, kv_cache_bytes: int,
            num_prefill: int = 0, num_decode: int = 0, num_instances: int = 1,
            ) -> dict[str, Any]:
    """Per request (ttft s, tpot ms) and the time the last one finished, as simulated for
    ``num_instances`` data-parallel instances, or ``num_prefill`` prefill and ``num_decode``
    decode instances, each an engine like the benchmark's on a device of ``profile``."""
    from tessera.config import CacheConfig
    from tessera.model.loader import read_config
    from tessera.sim.hardware import system_from_profile
    from tessera.sim.local import local_engine
    from tessera.sim.local_cluster import (
        Requests,
        simulate_data_parallel,
        simulate_prefill_decode,
    )
    from tessera.sim.model import costs_from_config

    system = system_from_profile(json.loads(profile.read_text()))
    model = costs_from_config(read_config(model_dir), name=model_dir)
    block_size = CacheConfig().block_size
    kv_bytes_per_block = block_size * model.kv_elements_per_token * model.num_layers * 4.0
    engine = replace(local_engine(system, model, "fp32", 256, max_num_batched_tokens),
                     num_blocks=int(kv_cache_bytes // kv_bytes_per_block))
    reqs = Requests(tuple(prompts), tuple(outputs), tuple(arrival_s))
    if num_prefill:
        times = simulate_prefill_decode(engine, reqs, num_prefill, num_decode)
    else:
        times = simulate_data_parallel(engine, reqs, num_instances)
    rows = [(ttft / 1e3, tpot) for ttft, tpot in zip(times.ttft_ms, times.tpot_ms, strict=True)]
    return {"rows": [(a, b if not math.isnan(b) else 0.0) for a, b in rows],
            "wall_s": times.end_s}
