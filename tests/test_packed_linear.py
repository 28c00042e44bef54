"""oneDNN-packed linears: same results as ``F.linear`` at every row count, what gets packed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tessera.model.kernels import linear as kl
from tessera.model.moe import MoEFFNUnit, moe_spec_from_config
from tessera.model.spec import spec_from_config

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
    # A non-contiguous input (a column slice) gives the same rows.
    wide = torch.randn(*shape[:-1], 96, generator=gen)
    torch.testing.assert_close(packed(wide[..., ::2]), F.linear(wide[..., ::2], plain.weight,
                                                                 plain.bias), rtol=1e-5, atol=1e-4)


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


def test_packed_experts_match_plain_experts():
    cfg = dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=32,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
        intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
    )
    spec, moe = spec_from_config(cfg), moe_spec_from_config(cfg)
    assert moe is not None
    unit = MoEFFNUnit(spec, moe, layer_id=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unit.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    outs = {}
    for rows in (1, 2, 19):
        x = torch.randn(rows, 32, generator=gen)
        outs[rows] = (x, unit.experts_forward(x, *unit.route(x)))
    assert kl.pack_linears(unit) == 2 * 8  # gate_up and down of each expert
    for x, want in outs.values():
        torch.testing.assert_close(unit.experts_forward(x, *unit.route(x)), want,
                                   rtol=1e-5, atol=1e-5)
