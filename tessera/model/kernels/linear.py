"""Weight matmuls in a packed layout on CPU: weight panels (Tessera's kernel) or oneDNN's.

Why: MKL's ``sgemm`` (what ``F.linear`` calls for float32 on CPU) is at its worst for a handful
of rows against a transposed weight, which is exactly a decode step of a few sequences. So on CPU
every float32 ``nn.Linear`` is also packed once at load time, and so are the routed experts'
matrices (``Experts.pack_weights``).

Where the C++ kernels are built with AVX-512 (or AVX2 and FMA) and the output size is a multiple
of 32, the weight
is held in panels and multiplied by ``panel_linear.cpp`` (layout and reasons in
``panel_gemm.h``): it prefetches the next slice of weights while it computes the current one,
and has no per-call set-up, so it wins where a step streams weights (few rows) and is even with
oneDNN where it computes (a prefill chunk). Holding a third layout would cost the weights' size
once more, so the panels take every call, from one row.

Elsewhere the weight is held in oneDNN's packed layout (the same ``mkldnn`` ops torch's own
compiler uses for CPU linears). A oneDNN call has a fixed cost over an MKL one that small
matrices cannot win back at a few rows, and at one or two rows MKL's GEMV streams the weights
faster on Intel CPUs, where MKL runs its tuned small-row code. So a call takes the packed path
from 4 rows for matrices of 2 MiB or more and from 16 rows for smaller ones
(``min_packed_rows``), and the plain weight otherwise; on other CPUs matrices of 2 MiB or more
take it from one row (``mkl_small_rows_tuned``). The figures behind these thresholds are in
benchmarks/RESULTS.md ("Float32 linears").

A packed linear holds both layouts, which costs the weights' size again in host memory; the KV
pool is sized after packing, so that memory is accounted for. Anything that cannot be packed
(not CPU, not float32, neither kernel usable, ``TESSERA_DISABLE_KERNELS=1``, or a linear its
module lists in ``keep_plain_linears`` because it only reads the weight) stays an ``nn.Linear``.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F
from torch import nn

from tessera.model.kernels.build import kernel_available, kernels_disabled

# oneDNN picks its blocking for this many rows; measured insensitive between 8 and 64.
_ROWS_HINT = 32


@functools.cache
def packing_available() -> bool:
    """True when oneDNN's packed linear runs here and matches ``F.linear`` on a small case."""
    if kernels_disabled() or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(24, 40, generator=gen)
        b = torch.randn(24, generator=gen)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, _ROWS_HINT)
        for rows in (1, 3, 37):
            x = torch.randn(rows, 40, generator=gen)
            got = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
            if not torch.allclose(got, F.linear(x, w, b), rtol=1e-4, atol=1e-4):
                return False
    except (RuntimeError, AttributeError):
        return False
    return True


PANEL = 32
"""Output columns per weight panel (``panel_gemm.h``)."""


@functools.cache
def panel_available() -> bool:
    """Whether the weight-panel kernel runs here (C++ kernels built, with AVX-512 or AVX2+FMA)."""
    return kernel_available() and bool(torch.ops.tessera_kernels.panel_native())


def panel_max_rows(weight: torch.Tensor) -> int:
    """Most rows a call with ``weight`` [out, in] takes the weight panels for; more take the
    plain weight (MKL).

    Why: an AVX2 build's micro-kernel multiplies 3 rows at a time (16 registers). Where a
    weight streams from memory (2 MiB or more) it beats MKL up to 64 rows and loses ~10% at
    512 (the ~110M Llama's matrices, 2 threads, AVX2 AMD EPYC: benchmarks/RESULTS.md, "Float32
    linears"); a small weight that stays in cache runs even with MKL at 16 rows and ~15%
    behind it at 64. An AVX-512 build's 12-row kernel takes every call."""
    if not _avx2_panels() or weight.dtype == torch.bfloat16:
        # bfloat16: the plain path would be torch's bfloat16 matmul, which on a CPU without
        # native bfloat16 dot products widens the weight on every call.
        return sys.maxsize
    return 64 if weight.numel() * weight.element_size() >= 2 << 20 else 15


@functools.cache
def _avx2_panels() -> bool:
    return panel_available() and torch.ops.tessera_kernels.panel_micro_rows() < 12


def _packable(weight: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in dtypes
        and weight.dim() == 2
        and weight.numel() > 0
    )


def panel_fits(weight: torch.Tensor) -> bool:
    """Whether ``weight`` [out, in] is packed in panels (else in oneDNN's layout): float32 or
    bfloat16 (panels keep the weight's dtype; the kernel sums in float32)."""
    return (
        _packable(weight, (torch.float32, torch.bfloat16))
        and weight.shape[0] % PANEL == 0
        and panel_available()
    )


def can_pack(weight: torch.Tensor) -> bool:
    """Whether ``weight`` [out, in] would be packed (CPU, non-empty, a kernel usable: panels
    for float32 or bfloat16, oneDNN's layout for float32)."""
    return panel_fits(weight) or (_packable(weight) and packing_available())


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``, ...); empty where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def mkl_small_rows_tuned() -> bool:
    """Whether MKL's few-row matmuls are the fast ones the 4-row threshold was measured with:
    False on AMD CPUs, where the packed path won at every row count measured (module
    docstring); True elsewhere."""
    return cpu_vendor() != "AuthenticAMD"


def min_packed_rows(weight: torch.Tensor) -> int:
    """Fewest rows for which a call with ``weight`` [out, in] takes the packed path (see the
    module docstring for the measurements)."""
    if panel_fits(weight):
        return 1
    if weight.numel() * weight.element_size() < 2 << 20:
        return 16
    return 4 if mkl_small_rows_tuned() else 1


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] reordered for :func:`packed_linear`: panels [out/32, in, 32] where
    ``panel_fits``, else an opaque oneDNN tensor."""
    w = weight.detach()
    return to_panels(w) if panel_fits(w) else pack_onednn(w)


def to_panels(weight: torch.Tensor) -> torch.Tensor:
    """[..., out, in] -> [..., out/32, in, 32]: for panel p and every input k, the weights of
    output columns 32p..32p+31 side by side (``panel_gemm.h``). ``out`` must be a multiple of
    ``PANEL``."""
    *lead, out_features, in_features = weight.shape
    w = weight.detach().reshape(*lead, out_features // PANEL, PANEL, in_features)
    return w.transpose(-1, -2).contiguous()


def pack_onednn(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] in oneDNN's packed layout (an opaque tensor; needs
    ``packing_available``), whatever ``panel_fits`` says: :func:`packed_linear` takes it too."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _ROWS_HINT)


def packed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    packed: torch.Tensor,
    min_rows: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x [..., in] -> [..., out], through ``packed`` (from
    :func:`pack_weight` of ``weight``) when x has at least ``min_rows`` rows (and, for weight
    panels, at most ``panel_max_rows(weight)``)."""
    rows = x.reshape(-1, x.shape[-1])  # [N, in]
    if rows.shape[0] < min_rows:
        return F.linear(x, weight, bias)
    if not packed.is_mkldnn:  # weight panels
        if rows.shape[0] > panel_max_rows(weight):
            return F.linear(x, weight, bias)
        return torch.ops.tessera_kernels.panel_linear(x, packed, bias)  # [..., out]
    if not rows.is_contiguous():
        rows = rows.contiguous()
    y = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")  # [N, out]
    return y.view(*x.shape[:-1], weight.shape[0])


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` that also holds its weight packed (``pack_weight``; inference only)."""

    packed_weight: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)  # no fresh weight: take over the loaded one
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        # A buffer, not a parameter: the packed layout is not a checkpoint tensor.
        self.register_buffer("packed_weight", pack_weight(linear.weight), persistent=False)
        self.min_packed_rows = min_packed_rows(linear.weight)
        self.max_packed_rows = (panel_max_rows(linear.weight) if self.packed_weight.dim() == 3
                                else sys.maxsize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The few-row case first and in place: batch-1 decode calls this ~50 times a step, and
        # the extra call and reshape of ``packed_linear`` measured ~0.3 ms a step there
        # (benchmarks/packed_linear.py, 1 row).
        numel = x.numel()
        if (numel < self.min_packed_rows * self.in_features
                or numel > self.max_packed_rows * self.in_features):
            return F.linear(x, self.weight, self.bias)
        return packed_linear(x, self.weight, self.packed_weight, self.min_packed_rows, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", packed"


def pack_linears(model: nn.Module) -> int:
    """Replace every packable ``nn.Linear`` under ``model`` with a :class:`PackedLinear`;
    returns how many were replaced. A module lists the child linears whose ``.weight`` it reads
    itself in a ``keep_plain_linears`` attribute; those stay as they are.

    A module that holds weight matrices outside ``nn.Linear`` (the routed experts' stacked
    weights) packs them in its own ``pack_weights()`` method, which this calls; those count
    too."""
    count = 0
    for parent in list(model.modules()):
        pack_own = getattr(parent, "pack_weights", None)
        if callable(pack_own):
            count += int(pack_own())
        keep = getattr(parent, "keep_plain_linears", ())
        for name, child in list(parent.named_children()):
            if (
                type(child) is nn.Linear  # not already a PackedLinear
                and name not in keep
                and can_pack(child.weight)
            ):
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count
