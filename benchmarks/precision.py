"""Precision axis: Tessera float32 and int8 weights against llama.cpp f32 and q8_0, same model,
same requests, one run.

Model: the ~110M-parameter random Llama of ``benchmarks/models.py`` (float32 checkpoint).
Tessera runs it in float32, in bfloat16 (``dtype="bfloat16"``: weights, activations and KV
cache; matmuls sum in float32) and with weight-only int8 (``quantization="int8"``:
int8 weights, one float32 scale per output channel, float32 activations); llama.cpp with the
checkpoint converted to f32, bf16 and q8_0 GGUFs (q8_0: int8 weights with a scale per block of 32,
8.5 bits a weight), measured by its own ``llama-batched-bench`` (built with ``llama-server``,
see ``benchmarks/peers/llama_server.py``). Workload: B prompts of 128 tokens, 64 greedy output tokens each (EOS
ignored), all submitted at once, B = 1 and 64; total tokens/s (prompt + output over wall time).
Batch 1 also reports the decode rate alone (after the prompt; llama.cpp: its S_TG).

How close decode comes to the memory: each decode step reads every weight once, so
``weight bytes x decode tokens/s`` over a measured streaming rate (the sum of a 1 GiB float32
tensor with the same threads) says what share of the machine's bandwidth a step uses.

    python benchmarks/precision.py [--threads 2] [--batches 1,64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.offline_throughput import isolated, set_wait_policy  # noqa: E402
from benchmarks.peers import Workload  # noqa: E402

MODEL_DIR = REPO_ROOT / ".bench" / "models" / "llama-100m"
PROMPT_TOKENS = 128
OUTPUT_TOKENS = 64


def workload(batch: int) -> Workload:
    return [([(300 + 7 * i + j) % 31000 + 500 for j in range(PROMPT_TOKENS)], OUTPUT_TOKENS)
            for i in range(batch)]


def tessera_run(model_dir: str, batch: int, threads: int, dtype: str,
                quantization: str | None) -> dict[str, Any]:
    from tessera import LLM, SamplingParams

    llm = LLM(model_dir, dtype=dtype, device="cpu", num_threads=threads,
              kv_cache_memory=2 << 30, quantization=quantization)
    weight_bytes = sum(b.numel() * b.element_size() for name, b in
                       llm.engine.model.named_buffers() if name.endswith(("qweight", "scales")))
    weight_bytes += sum(m.weight.numel() * m.weight.element_size()
                        for m in llm.engine.model.modules() if type(m).__name__ == "PackedLinear")
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    llm.generate([[400] * 16], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    requests = workload(batch)
    engine = llm.engine
    start_s = time.perf_counter()
    for i, (prompt, _) in enumerate(requests):
        engine.add_request(str(i), prompt, params)
    first_s = None
    num_out = 0
    while engine.has_unfinished_requests():
        step = engine.step_with_deltas()
        if first_s is None and len(step.deltas) == batch:
            first_s = time.perf_counter()  # every prompt done
        num_out += len(step.deltas)
    wall_s = time.perf_counter() - start_s
    assert num_out == batch * OUTPUT_TOKENS
    decode_s = wall_s - (first_s - start_s) if first_s else wall_s
    return {"total_tokens_per_s": batch * (PROMPT_TOKENS + OUTPUT_TOKENS) / wall_s,
            "decode_tokens_per_s": batch * (OUTPUT_TOKENS - 1) / decode_s,
            "weight_bytes": weight_bytes}


def llamacpp_run(model_dir: str, batch: int, threads: int, outtype: str) -> dict[str, Any]:
    """llama.cpp's own ``llama-batched-bench`` on the same shape: ``batch`` sequences, each
    its own prompt of PROMPT_TOKENS, then OUTPUT_TOKENS decoded together."""
    from benchmarks.peers.llama_server import ensure_llama_server
    from benchmarks.peers.llamacpp import convert_to_gguf

    gguf = convert_to_gguf(model_dir, str(Path(model_dir) / f"model-{outtype}.gguf"), outtype)
    binary = ensure_llama_server().with_name("llama-batched-bench")
    ctx = batch * (PROMPT_TOKENS + OUTPUT_TOKENS) + 64
    out = subprocess.run(
        [str(binary), "-m", gguf, "-c", str(ctx), "-b", "2048", "-ub", "512",
         "-npp", str(PROMPT_TOKENS), "-ntg", str(OUTPUT_TOKENS), "-npl", str(batch),
         "-t", str(threads), "-tb", str(threads)],
        capture_output=True, text=True, timeout=1800)
    rows = [line for line in out.stdout.splitlines() if line.startswith("|") and
            line.split("|")[1].strip().isdigit()]
    if out.returncode != 0 or not rows:
        raise RuntimeError(f"llama-batched-bench failed: {out.stderr.strip()[-400:]}")
    cells = [c.strip() for c in rows[-1].strip("|").split("|")]
    # PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s
    return {"total_tokens_per_s": float(cells[9]), "decode_tokens_per_s": float(cells[7]),
            "weight_bytes": Path(gguf).stat().st_size}


def streaming_gb_s(threads: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(1 << 28)  # 1 GiB
    x.sum()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return {"gb_s": x.numel() * 4 / best / 1e9}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--peers", default="llamacpp", help="llamacpp or none")
    ap.add_argument("--omp-wait-policy", choices=["ACTIVE", "PASSIVE"], default=None)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    set_wait_policy(args.omp_wait_policy)

    from benchmarks.models import make_random_llama

    model_dir = make_random_llama(str(MODEL_DIR))
    t = args.threads
    rate = isolated(streaming_gb_s, t)["gb_s"]
    rows: list[dict[str, Any]] = []
    for batch in (int(b) for b in args.batches.split(",")):
        for dtype, tessera_q, peer_type, label in (
                ("float32", None, "f32", "float32 / f32"),
                ("bfloat16", None, "bf16", "bfloat16 / bf16"),
                ("float32", "int8", "q8_0", "int8 / q8_0")):
            ours = isolated(tessera_run, model_dir, batch, t, dtype, tessera_q)
            try:
                peer = (llamacpp_run(model_dir, batch, t, peer_type)
                        if args.peers == "llamacpp" else {"error": "not run"})
            except RuntimeError as e:
                peer = {"error": str(e)}
            rows.append({"precision": label, "batch": batch, "tessera": ours,
                         "llama.cpp": peer})
    print(f"\n~110M Llama, {PROMPT_TOKENS}-token prompts + {OUTPUT_TOKENS} output tokens, "
          f"{t} threads; streaming rate {rate:.1f} GB/s\n")
    head = (f"{'precision':<14} {'batch':>5} {'Tessera':>9} {'llama.cpp':>10} {'ratio':>6}"
            f" {'decode: Tessera':>16} {'llama.cpp':>10} {'ratio':>6} {'of bandwidth':>13}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ours, peer = r["tessera"], r["llama.cpp"]
        if "error" in ours:
            print(f"{r['precision']:<14} {r['batch']:>5}  Tessera failed: {ours['error']}")
            continue
        p_total = peer.get("total_tokens_per_s")
        line = (f"{r['precision']:<14} {r['batch']:>5} {ours['total_tokens_per_s']:>9.0f} "
                f"{p_total or float('nan'):>10.0f} "
                f"{ours['total_tokens_per_s'] / p_total if p_total else float('nan'):>5.2f}x")
        if r["batch"] == 1:
            p_dec = peer.get("decode_tokens_per_s")
            share = ours["weight_bytes"] * ours["decode_tokens_per_s"] / (rate * 1e9)
            line += (f" {ours['decode_tokens_per_s']:>16.0f} {p_dec or float('nan'):>10.0f} "
                     f"{ours['decode_tokens_per_s'] / p_dec if p_dec else float('nan'):>5.2f}x"
                     f" {share:>12.0%}")
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "stream_gb_s": rate}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
