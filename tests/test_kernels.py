"""Paged decode attention: C++ kernel vs pure-torch fallback vs a naive loop reference."""

from __future__ import annotations

import math

import pytest
import torch

from tessera.model.kernels import build as kb
from tessera.model.kernels import paged_decode as pd


def _naive(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Explicit per-key loops and a two-pass softmax in float64: [B, H, d]."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.zeros(batch, num_heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        length = int(lens[b])
        pos = length - 1
        visible = [j for j in range(length) if window is None or j > pos - window]
        for h in range(num_heads):
            kh = h // group
            qh = q[b, h].double()
            keys, values = [], []
            for j in visible:
                block, off = int(tables[b, j // block_size]), j % block_size
                keys.append(kv_cache[0, block, off, kh].double())
                values.append(kv_cache[1, block, off, kh].double())
            scores = [float(qh @ k) * scale for k in keys]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            total = sum(weights)
            for w, v in zip(weights, values, strict=True):
                out[b, h] += (w / total) * v
    return out


def _case(
    seed: int,
    batch: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    max_len: int,
    dtype: torch.dtype,
    lens: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q, cache, shuffled block tables (padded with 0) and sequence lengths."""
    gen = torch.Generator().manual_seed(seed)
    if lens is None:
        lens = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
    need = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = sum(need) + 3  # spare blocks that no sequence owns
    perm = torch.randperm(num_blocks, generator=gen).tolist()  # shuffled, non-contiguous ids
    width = max(need) + 2  # extra padding columns beyond the longest sequence
    tables = torch.zeros(batch, width, dtype=torch.int64)
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor(perm[used : used + n])
        used += n
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(batch, num_heads, head_dim, generator=gen)
    return q.to(dtype), cache.to(dtype), tables, torch.tensor(lens, dtype=torch.int64)


# (seed, batch, heads, kv heads, head_dim, block size, max len, window)
CASES = [
    (0, 4, 4, 4, 16, 16, 300, None),  # MHA
    (1, 5, 8, 2, 32, 16, 300, None),  # GQA 4:1
    (2, 3, 6, 1, 16, 1, 120, None),  # MQA, block size 1
    (3, 6, 4, 2, 64, 16, 300, 37),  # sliding window, window not a block multiple
    (4, 4, 4, 4, 24, 1, 80, 16),  # window, block size 1, head_dim not a multiple of 16
    (5, 4, 2, 1, 16, 16, 300, 1000),  # window longer than every sequence
    (6, 12, 6, 3, 16, 16, 200, None),  # kv heads split into uneven ranges across work items
]
IDS = [f"h{c[2]}kv{c[3]}d{c[4]}bs{c[5]}w{c[7]}" for c in CASES]

_EDGE_LENS = [1, 2, 15, 16, 17, 31, 32, 33, 255, 300]  # around block and tile edges


def _require_kernel() -> None:
    if kb.kernels_disabled():
        pytest.skip("TESSERA_DISABLE_KERNELS is set")
    if not kb.kernel_available():
        pytest.skip("paged decode C++ extension could not be built here (see the warning log)")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fallback_matches_naive(case: tuple) -> None:
    seed, batch, heads, kv_heads, dim, bs, max_len, window = case
    q, cache, tables, lens = _case(seed, batch, heads, kv_heads, dim, bs, max_len, torch.float32)
    scale = dim**-0.5
    ref = _naive(q, cache, tables, lens, scale, window)
    got = pd.paged_decode_reference(q, cache, tables, lens, scale, window)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_padded_batched_path_matches_naive(case: tuple) -> None:
    # The accelerator path, checked here on CPU tensors.
    seed, batch, heads, kv_heads, dim, bs, max_len, window = case
    q, cache, tables, lens = _case(seed, batch, heads, kv_heads, dim, bs, max_len, torch.float32)
    scale = dim**-0.5
    ref = _naive(q, cache, tables, lens, scale, window)
    got = pd.paged_decode_padded(q, cache, tables, lens, scale, window)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernel_matches_naive_and_fallback_fp32(case: tuple) -> None:
    _require_kernel()
    seed, batch, heads, kv_heads, dim, bs, max_len, window = case
    q, cache, tables, lens = _case(seed, batch, heads, kv_heads, dim, bs, max_len, torch.float32)
    scale = dim**-0.5
    got = pd.paged_decode_attention(q, cache, tables, lens, scale, window)
    assert got.shape == q.shape and got.dtype == torch.float32
    ref = _naive(q, cache, tables, lens, scale, window)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    fallback = pd.paged_decode_reference(q, cache, tables, lens, scale, window)
    torch.testing.assert_close(got, fallback, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("window", [None, 17])
def test_kernel_edge_lengths(block_size: int, window: int | None) -> None:
    """Lengths on both sides of block and 32-key tile boundaries, in one GQA batch."""
    _require_kernel()
    q, cache, tables, lens = _case(
        7, len(_EDGE_LENS), 4, 2, 32, block_size, 0, torch.float32, lens=_EDGE_LENS
    )
    got = pd.paged_decode_attention(q, cache, tables, lens, 0.2, window)
    fallback = pd.paged_decode_reference(q, cache, tables, lens, 0.2, window)
    torch.testing.assert_close(got, fallback, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES[:4], ids=IDS[:4])
def test_kernel_half_precision(case: tuple, dtype: torch.dtype) -> None:
    _require_kernel()
    seed, batch, heads, kv_heads, dim, bs, max_len, window = case
    q, cache, tables, lens = _case(seed, batch, heads, kv_heads, dim, bs, max_len, dtype)
    scale = dim**-0.5
    got = pd.paged_decode_attention(q, cache, tables, lens, scale, window)
    assert got.dtype == dtype
    # The kernel accumulates in float32 from the same rounded inputs: only the output rounding
    # (one ulp of bf16 is 2^-8 relative) separates it from the exact result.
    ref = _naive(q, cache, tables, lens, scale, window)
    torch.testing.assert_close(got.double(), ref, atol=2e-2, rtol=2e-2)
    fallback = pd.paged_decode_reference(q, cache, tables, lens, scale, window)
    torch.testing.assert_close(got.float(), fallback.float(), atol=3e-2, rtol=3e-2)


def test_kernel_follows_thread_count() -> None:
    """Same result with 1 thread as with the default (the work split must not matter)."""
    _require_kernel()
    q, cache, tables, lens = _case(8, 9, 8, 2, 32, 16, 300, torch.float32)
    many = pd.paged_decode_attention(q, cache, tables, lens, 0.3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = pd.paged_decode_attention(q, cache, tables, lens, 0.3)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, many, atol=0, rtol=0)


def test_kernel_rejects_bad_block_ids() -> None:
    _require_kernel()
    q, cache, tables, lens = _case(9, 2, 2, 2, 16, 16, 40, torch.float32)
    tables[0, 0] = cache.shape[1]  # one past the last block
    with pytest.raises(RuntimeError, match="block id out of range"):
        pd.paged_decode_attention(q, cache, tables, lens, 0.25)


def test_disable_env_forces_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_DISABLE_KERNELS", "1")
    assert not pd.kernel_available()
    calls = []
    real = pd.paged_decode_reference

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pd, "paged_decode_reference", spy)
    q, cache, tables, lens = _case(10, 2, 2, 1, 16, 16, 40, torch.float32)
    pd.paged_decode_attention(q, cache, tables, lens, 0.25)
    assert calls == [1]


def test_unsupported_dtype_uses_fallback() -> None:
    q, cache, tables, lens = _case(11, 3, 4, 2, 16, 16, 50, torch.float64)
    got = pd.paged_decode_attention(q, cache, tables, lens, 0.25, 20)
    ref = _naive(q, cache, tables, lens, 0.25, 20)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.processes
def test_import_does_not_build() -> None:
    """Importing the package must not pay the build; only the first call does."""
    import subprocess
    import sys

    code = (
        "import tessera.model.dense, tessera.model.kernels.build as kb; "
        "assert 'tried' not in kb._state"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_build_failure_falls_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """A source that does not compile: one warning, then the fallback's results, no exception."""
    broken = tmp_path / "paged_decode.cpp"
    broken.write_text("#error deliberately broken\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("TESSERA_DISABLE_KERNELS", raising=False)
    monkeypatch.setattr(kb, "_SOURCES", [broken])
    monkeypatch.setattr(kb, "_state", {})  # restored afterwards: the real build stays usable
    q, cache, tables, lens = _case(12, 3, 4, 2, 16, 16, 60, torch.float32)
    with caplog.at_level("WARNING", logger=kb.__name__):
        first = pd.paged_decode_attention(q, cache, tables, lens, 0.25)
        second = pd.paged_decode_attention(q, cache, tables, lens, 0.25)
    warnings = [r for r in caplog.records if "fallback" in r.getMessage()]
    assert len(warnings) == 1
    ref = pd.paged_decode_reference(q, cache, tables, lens, 0.25)
    torch.testing.assert_close(first, ref)
    torch.testing.assert_close(second, ref)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[:6], ids=IDS[:6])
def test_fp32_queries_over_a_half_precision_cache(case: tuple, cache_dtype: torch.dtype) -> None:
    # kv_cache_dtype narrower than the model: the kernel and both fallbacks read the narrow
    # cache and compute in float32; all must agree with the naive loop over the same values.
    seed, batch, heads, kv_heads, dim, bs, max_len, window = case
    q, cache, tables, lens = _case(seed, batch, heads, kv_heads, dim, bs, max_len, torch.float32)
    narrow = cache.to(cache_dtype)
    scale = dim**-0.5
    ref = _naive(q, narrow.float(), tables, lens, scale, window)
    for fn in (pd.paged_decode_reference, pd.paged_decode_padded, pd.paged_decode_attention):
        got = fn(q, narrow, tables, lens, scale, window)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_kernels_run_on_every_thread():
    """The extension is built with torch's threading backend: a parallel loop in it spreads
    over the threads torch is set to (compiled without OpenMP, it ran on one)."""
    _require_kernel()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.tessera_kernels.parallel_threads(64) == 2
        torch.set_num_threads(1)
        assert torch.ops.tessera_kernels.parallel_threads(64) == 1
    finally:
        torch.set_num_threads(before)
