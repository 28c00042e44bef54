"""Micro-benchmark of float32 weight matmuls on CPU: MKL (``F.linear``) vs oneDNN's packed layout
vs Tessera's weight panels.

One pass over the weight matrices of the ~100M benchmark Llama (12 layers of fused qkv, o,
fused gate/up and down projections, then the LM head: 109M weights, 438 MB in float32) at each
row count, every matrix a distinct tensor so the pass streams from memory as a decode step
does. Columns: ``F.linear`` (MKL), ``packed_linear`` forced onto oneDNN's layout and onto the
weight panels (where the panel kernel runs: AVX-512 or AVX2 builds), and ``PackedLinear`` as the engine
calls it (its own layout and row threshold, see ``tessera/model/kernels/linear.py``). The LM
head is left out above 64 rows (a step only samples a few rows). Best of several passes.

    python benchmarks/packed_linear.py [--threads 2] [--rows 1,2,4,8,12,16,32,64,512]

``--experts`` times one MoE layer's routed experts instead: the 8 experts of the benchmark
Mixtral (512 -> 2x1024 -> 512) and of a Qwen3-MoE-sized layer (512 -> 2x256 -> 512), each
expert given ``rows`` tokens, through ``Experts._expert`` (the per-expert path where the native
experts kernel does not run: weight panels where they fit, else oneDNN's layout or MKL by row
count), against the same matmuls on the plain weights (MKL) and forced onto the packed path.
``benchmarks/moe_kernel.py`` times the native kernel against oneDNN's layout.

    python benchmarks/packed_linear.py --experts --threads 1 --rows 8,16,32,64,128,256
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tessera.model.experts import Experts  # noqa: E402
from tessera.model.kernels import linear as kl  # noqa: E402
from tessera.model.moe_spec import MoESpec  # noqa: E402

HIDDEN, INTERMEDIATE, NUM_LAYERS, VOCAB = 768, 2048, 12, 32000


def _best_ms(fn: Callable[[], None], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _pass(kind: str, used: list[kl.PackedLinear], onednn: dict[int, torch.Tensor],
          panels: dict[int, torch.Tensor], inputs: dict[int, torch.Tensor]) -> Callable[[], None]:
    """One pass over ``used``: plain ``F.linear`` (mkl), oneDNN's or the panels' packed path at
    any row count (onednn, panels; weights by ``id`` of the linear), or the module as the engine
    calls it (engine)."""
    def run() -> None:
        for lin in used:
            x = inputs[lin.in_features]
            if kind == "mkl":
                F.linear(x, lin.weight)
            elif kind == "onednn":
                kl.packed_linear(x, lin.weight, onednn[id(lin)], 1)
            elif kind == "panels":  # the kernel itself, at every row count
                torch.ops.tessera_kernels.panel_linear(x, panels[id(lin)], None)
            else:
                lin(x)
    return run


def _experts_pass(kind: str, experts: Experts, x: torch.Tensor,
                  hidden: torch.Tensor) -> Callable[[], None]:
    """Every local expert over ``x`` [rows, D]: the two plain matmuls (mkl), the two packed ones
    forced (packed), or ``Experts._expert`` with its own choice of path (engine)."""
    packed = experts._packed
    assert packed is not None

    def run() -> None:
        for e in range(len(experts.expert_ids)):
            if kind == "mkl":
                F.linear(x, experts.gate_up_proj[e])
                F.linear(hidden, experts.down_proj[e])
            elif kind == "packed":
                kl.packed_linear(x, experts.gate_up_proj[e], packed[e][0], 1)
                kl.packed_linear(hidden, experts.down_proj[e], packed[e][1], 1)
            else:
                experts._expert(e, x)
    return run


def experts_table(row_counts: list[int], repeats: int) -> None:
    """ms for one layer's 8 experts at each per-expert row count (see the module docstring)."""
    gen = torch.Generator().manual_seed(0)
    print(f"{'experts':>24} {'rows':>6} {'MKL':>9} {'packed':>9} {'engine':>9} {'MKL/engine':>11}")
    for name, inter in (("mixtral 512x2x1024", 1024), ("qwen3-moe 512x2x256", 256)):
        spec = MoESpec(num_experts=8, top_k=2, hidden_size=512, moe_intermediate_size=inter,
                       moe_layers=(True,))
        experts = Experts(spec)
        with torch.no_grad():
            for param in (experts.gate_up_proj, experts.down_proj):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        experts.pack_weights(native=False)  # the per-expert path: this table's subject
        for rows in row_counts:
            x = torch.randn(rows, 512, generator=gen)
            hidden = torch.randn(rows, inter, generator=gen)
            t_mkl, t_packed, t_engine = (
                _best_ms(_experts_pass(kind, experts, x, hidden), repeats)
                for kind in ("mkl", "packed", "engine")
            )
            print(f"{name:>24} {rows:>6} {t_mkl:>9.2f} {t_packed:>9.2f} {t_engine:>9.2f} "
                  f"{t_mkl / t_engine:>10.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,2,4,8,12,16,32,64,512")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--experts", action="store_true",
                   help="time one MoE layer's routed experts instead of the Llama's linears")
    args = p.parse_args(argv)
    try:
        row_counts = [int(r) for r in args.rows.split(",")]
    except ValueError:
        p.error(f"--rows must be a comma list of integers, got {args.rows!r}")
    if any(r < 1 for r in row_counts):
        p.error("--rows must all be at least 1")
    if not kl.packing_available():
        print("oneDNN packing is not available here (or TESSERA_DISABLE_KERNELS is set)")
        return 1
    torch.set_num_threads(args.threads)
    if args.experts:
        print(f"one MoE layer's 8 experts, {args.threads} threads; ms per layer "
              f"(best of {args.repeats}); rows per expert")
        with torch.inference_mode():
            experts_table(row_counts, args.repeats)
        return 0
    shapes = [(3 * HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN),
              (HIDDEN, INTERMEDIATE)] * NUM_LAYERS + [(VOCAB, HIDDEN)]
    gen = torch.Generator().manual_seed(0)
    linears = []
    for out_features, in_features in shapes:
        lin = nn.Linear(in_features, out_features, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(out_features, in_features, generator=gen) * 0.02)
        linears.append(kl.PackedLinear(lin))
    total_mb = sum(lin.weight.numel() for lin in linears) * 4 / 1e6
    onednn = {id(lin): kl.pack_onednn(lin.weight) for lin in linears}
    with_panels = all(kl.panel_fits(lin.weight) for lin in linears)
    panels = {id(lin): kl.pack_weight(lin.weight) for lin in linears} if with_panels else {}
    kinds = ["mkl", "onednn", "panels", "engine"] if with_panels else ["mkl", "onednn", "engine"]

    print(f"{len(linears)} matrices, {total_mb:.0f} MB float32, {args.threads} threads; "
          "ms per pass (best of %d)" % args.repeats)
    if not with_panels:
        print("(no weight panels here: the panel kernel needs an AVX-512 build)")
    names = {"mkl": "MKL", "onednn": "oneDNN", "panels": "panels", "engine": "engine"}
    print(f"{'rows':>6} " + " ".join(f"{names[k]:>9}" for k in kinds)
          + f" {'MKL/engine':>11} {'oneDNN/engine':>14}")
    with torch.inference_mode():
        for rows in row_counts:
            used = linears if rows <= 64 else linears[:-1]
            inputs = {n: torch.randn(rows, n, generator=gen) for n in (HIDDEN, INTERMEDIATE)}
            t = {kind: _best_ms(_pass(kind, used, onednn, panels, inputs), args.repeats)
                 for kind in kinds}
            print(f"{rows:>6} " + " ".join(f"{t[k]:>9.1f}" for k in kinds)
                  + f" {t['mkl'] / t['engine']:>10.2f}x {t['onednn'] / t['engine']:>13.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
