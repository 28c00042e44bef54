"""Hugging Face transformers ``generate`` as a benchmark peer (static batches, greedy).

CLI::

    python benchmarks/peers/hf.py --hf-dir .bench/models/llama-100m --threads 2 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # executed as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.peers import CpuMeter, Workload, make_workload, summarize


def bench_transformers(
    hf_dir: str,
    requests: Workload,
    batch_size: int,
    n_threads: int,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Throughput of ``model.generate`` over ``requests`` in consecutive static batches.

    Requests are taken in workload order, ``batch_size`` at a time, left-padded (pad = EOS id,
    masked out) and decoded greedily with ``min_new_tokens = max_new_tokens =`` the largest
    output count in the batch, so EOS never stops a row early. Every row therefore generates the
    batch maximum; only each request's own requested count is counted as useful output
    (``num_output_tokens``); ``num_generated_tokens`` is what was actually computed, padding
    rows included. Prompt tokens count without padding. The timer covers building the
    padded tensors and ``generate`` for all batches (model loading and one small warm-up call
    are excluded).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(n_threads)
    model: Any = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype))
    model.eval()
    pad_id = model.generation_config.eos_token_id
    if isinstance(pad_id, list):
        pad_id = pad_id[0]
    pad_id = int(pad_id if pad_id is not None else 0)

    def run_batch(batch: Workload) -> int:
        num_new_tokens = max(num_out for _, num_out in batch)
        width = max(len(prompt) for prompt, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (prompt, _) in enumerate(batch):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                max_new_tokens=num_new_tokens,
                min_new_tokens=num_new_tokens,
                pad_token_id=pad_id,
                use_cache=True,
            )
        num_generated = out.shape[1] - width
        if num_generated != num_new_tokens:
            raise RuntimeError(f"generate made {num_generated} tokens, wanted {num_new_tokens}")
        return num_generated * len(batch)

    run_batch([(requests[0][0][:8], 2)])  # warm-up
    num_generated_tokens = 0
    meter = CpuMeter(n_threads)
    start_s = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        num_generated_tokens += run_batch(requests[first : first + batch_size])
    wall_s = time.perf_counter() - start_s
    cpu = meter.stop()
    return summarize(
        wall_s,
        sum(len(prompt) for prompt, _ in requests),
        sum(num_out for _, num_out in requests),
        engine="transformers",
        batch_size=batch_size,
        n_threads=n_threads,
        num_generated_tokens=num_generated_tokens,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""),
        **cpu,
    )


def main(argv: list[str] | None = None) -> None:
    """CLI: print the transformers figure for the standard seeded workload."""
    parser = argparse.ArgumentParser(description="transformers generate peer benchmark")
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=1024)
    parser.add_argument("--min-output", type=int, default=16)
    parser.add_argument("--max-output", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--omp-wait-policy",
        choices=["passive", "active", "unset"],
        default="passive",
        help="OMP_WAIT_POLICY for PyTorch's threads (unset: leave the environment alone)",
    )
    args = parser.parse_args(argv)
    if args.omp_wait_policy != "unset":
        if "torch" in sys.modules:
            raise RuntimeError("set OMP_WAIT_POLICY before torch is imported")
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    vocab_size = int(json.loads((Path(args.hf_dir) / "config.json").read_text())["vocab_size"])
    requests = make_workload(
        args.num_requests,
        args.min_prompt,
        args.max_prompt,
        args.min_output,
        args.max_output,
        vocab_size,
        args.seed,
    )
    result = bench_transformers(args.hf_dir, requests, args.batch_size, args.threads)
    print(json.dumps({"label": f"transformers batch_size={args.batch_size}", **result}))


if __name__ == "__main__":
    main()
