"""Packed linears (weight panels or oneDNN's layout): same results as ``F.linear`` at every row
count, what gets packed, and which layout."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tessera.model.kernels import linear as kl

pytestmark = pytest.mark.skipif(not kl.packing_available(), reason="oneDNN packing unavailable")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 48), (2, 48), (7, 48), (64, 48), (3, 5, 48)])
def test_packed_linear_matches_linear(shape, bias):
    gen = torch.Generator().manual_seed(0)
    plain = nn.Linear(48, 40, bias=bias)
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    packed = kl.PackedLinear(plain)
    x = torch.randn(shape, generator=gen)
    want = F.linear(x, plain.weight, plain.bias)
    got = packed(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # The packed path itself at every row count (the module only takes it from a few rows).
    forced = kl.packed_linear(x, plain.weight, packed.packed_weight, 1, plain.bias)
    torch.testing.assert_close(forced, want, rtol=1e-5, atol=1e-4)
    # A non-contiguous input (a column slice) gives the same rows.
    wide = torch.randn(*shape[:-1], 96, generator=gen)
    torch.testing.assert_close(packed(wide[..., ::2]), F.linear(wide[..., ::2], plain.weight,
                                                                 plain.bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("vendor", "big_rows"), [("GenuineIntel", 4), ("AuthenticAMD", 1), ("", 4)])
def test_min_packed_rows_follows_the_cpu(vendor, big_rows, monkeypatch):
    """In oneDNN's layout, matrices of 2 MiB or more go packed from 4 rows where MKL's few-row
    code is tuned, from 1 row on AMD CPUs; smaller ones from 16 rows everywhere."""
    monkeypatch.setattr(kl, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(kl, "panel_available", lambda: False)
    big, small = torch.empty(1024, 512), torch.empty(512, 256)  # 2 MiB and 0.5 MiB float32
    assert (kl.min_packed_rows(big), kl.min_packed_rows(small)) == (big_rows, 16)
    # A one-row call takes the path the rule says, and gives F.linear's result either way.
    gen = torch.Generator().manual_seed(0)
    plain = nn.Linear(512, 1024, bias=False)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(plain.weight.shape, generator=gen))
    packed = kl.PackedLinear(plain)
    calls: list[int] = []
    real = kl.packed_linear
    monkeypatch.setattr(kl, "packed_linear", lambda x, *a: calls.append(1) or real(x, *a))
    x = torch.randn(1, 512, generator=gen)
    torch.testing.assert_close(packed(x), F.linear(x, plain.weight), rtol=1e-5, atol=1e-4)
    assert bool(calls) == (big_rows == 1)


def needs_panels() -> None:
    if not kl.panel_available():
        pytest.skip("the weight-panel kernel needs the C++ kernels built with AVX-512 or AVX2")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 40), (5, 40), (13, 40), (700, 40), (3, 5, 40)])
@pytest.mark.parametrize("threads", [1, 2])
def test_panel_linear_matches_linear(shape, bias, threads):
    """Output sizes that are multiples of 32 take the panels from one row; row counts around the
    12-row micro-kernel, a k over the 256 of one chunk (300 features), rows over one row block
    (700 rows of 300 features: three blocks), and both thread counts."""
    needs_panels()
    gen = torch.Generator().manual_seed(0)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for in_features in (shape[-1], 300):
            plain = nn.Linear(in_features, 96, bias=bias)
            with torch.no_grad():
                for p in plain.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen))
            packed = kl.PackedLinear(plain)
            assert packed.packed_weight.shape == (3, in_features, 32)
            assert packed.min_packed_rows == 1
            x = torch.randn(*shape[:-1], in_features, generator=gen)
            want = F.linear(x, plain.weight, plain.bias).detach()
            scale = float(want.abs().max())
            torch.testing.assert_close(packed(x), want, rtol=1e-5, atol=1e-5 * scale)
            wide = torch.randn(*shape[:-1], 2 * in_features, generator=gen)[..., ::2]
            torch.testing.assert_close(packed(wide), F.linear(wide, plain.weight, plain.bias),
                                       rtol=1e-5, atol=1e-5 * scale)
    finally:
        torch.set_num_threads(old_threads)


def test_panels_only_for_output_sizes_that_fill_them():
    needs_panels()
    assert kl.pack_weight(torch.randn(64, 48)).shape == (2, 48, 32)
    assert kl.pack_weight(torch.randn(40, 48)).is_mkldnn  # 40 rows: oneDNN's layout
    assert kl.panel_fits(torch.randn(64, 48).to(torch.bfloat16))  # bfloat16 panels
    assert not kl.can_pack(torch.randn(40, 48).to(torch.bfloat16))  # nothing else for it


@pytest.mark.parametrize("rows", [1, 3, 4, 17, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_bfloat16_panels_sum_in_float32(rows, bias):
    """bfloat16 weights and activations in panels: the float32 product of the same bfloat16
    values, rounded once to bfloat16 (few rows widen in registers, many through a buffer)."""
    needs_panels()
    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(300, 64, bias=bias).to(torch.bfloat16)
    packed = kl.PackedLinear(linear)
    assert packed.packed_weight.dtype == torch.bfloat16 and packed.min_packed_rows == 1
    x = torch.randn(rows, 300, generator=gen).to(torch.bfloat16)
    got = packed(x)
    want = F.linear(x.float(), linear.weight.float(),
                    None if linear.bias is None else linear.bias.float()).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


class _Unit(nn.Module):
    keep_plain_linears = ("read_directly",)

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 8)
        self.read_directly = nn.Linear(16, 8)
        self.narrow = nn.Linear(16, 8).to(torch.bfloat16)


def test_pack_linears_replaces_float32_cpu_linears_only():
    model = nn.Sequential(_Unit(), nn.Linear(8, 4))
    x = torch.randn(3, 16)
    want = model[0].proj(x)
    assert kl.pack_linears(model) == 2
    assert isinstance(model[0].proj, kl.PackedLinear)
    assert isinstance(model[1], kl.PackedLinear)
    assert type(model[0].read_directly) is nn.Linear  # listed in keep_plain_linears
    assert type(model[0].narrow) is nn.Linear  # bfloat16 stays plain
    torch.testing.assert_close(model[0].proj(x), want, rtol=1e-5, atol=1e-5)
    assert kl.pack_linears(model) == 0  # packing twice changes nothing


MOE_CFG = dict(
    architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=48,
    num_hidden_layers=1, num_attention_heads=4, vocab_size=300, intermediate_size=40,
    num_local_experts=4, num_experts_per_tok=2,
)


@pytest.mark.parametrize("expert_ids", [None, (3, 1)])
def test_packed_experts_match_plain(expert_ids, monkeypatch):
    from tessera.model import experts as experts_mod
    from tessera.model.moe import moe_spec_from_config

    moe = moe_spec_from_config(MOE_CFG)
    assert moe is not None
    gen = torch.Generator().manual_seed(0)
    plain = experts_mod.Experts(moe, expert_ids)
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    packed = experts_mod.Experts(moe, expert_ids)
    packed.load_state_dict(plain.state_dict())
    wrapper = nn.Sequential(packed)
    num_local = len(packed.expert_ids)
    assert kl.pack_linears(wrapper) == 2 * num_local  # gate_up and down of each local expert
    assert kl.pack_linears(wrapper) == 0  # packing twice changes nothing

    calls: list[int] = []

    def counting(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return kl.packed_linear(x, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(experts_mod, "packed_linear", counting)
    # 40 tokens put 16-63 rows on every expert and 300 about 150 (both in the small matrices'
    # packed range); 5 tokens stay under it, 1200 (about 600 rows each) over MAX_PACKED_ROWS,
    # and one token takes the batch-1 path.
    for num_tokens in (40, 300, 5, 1200, 1):
        calls.clear()
        x = torch.randn(num_tokens, 48, generator=gen)
        ids = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(num_tokens)])
        weights = torch.rand(num_tokens, 2, generator=gen)
        torch.testing.assert_close(packed(x, ids, weights), plain(x, ids, weights),
                                   rtol=1e-5, atol=1e-5)
        if num_tokens == 40:
            assert len(calls) == 2 * num_local and min(calls) >= 16 and max(calls) < 64
        elif num_tokens == 300:
            assert len(calls) == 2 * num_local and min(calls) >= 64
            assert max(calls) < experts_mod.MAX_PACKED_ROWS
        else:
            assert calls == []


def test_panels_take_few_rows_and_mkl_many_where_it_is_faster():
    """On an AVX2 build a call takes the panels up to ``panel_max_rows`` (more for a weight
    that streams from memory) and the plain weight beyond, exactly as ``F.linear``; an AVX-512
    build takes the panels at every count."""
    needs_panels()
    gen = torch.Generator().manual_seed(3)
    small = nn.Linear(64, 96, bias=False)
    big = nn.Linear(1024, 1024, bias=False)  # 4 MiB
    limits = [kl.panel_max_rows(m.weight) for m in (small, big)]
    if kl.panel_available() and torch.ops.tessera_kernels.panel_micro_rows() >= 12:
        assert limits == [sys.maxsize, sys.maxsize]
        return
    assert limits == [15, 64]
    for linear, limit in ((small, 15), (big, 64)):
        packed = kl.PackedLinear(linear)
        for rows in (1, limit, limit + 1):
            x = torch.randn(rows, linear.in_features, generator=gen)
            want = F.linear(x, linear.weight)
            got = packed(x)
            if rows > limit:
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
