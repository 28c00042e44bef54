"""An FFN worker checks every request header against its configuration before allocating or
receiving anything: a forged header is dropped (with the rest of its sender's stream, which
can no longer be parsed), reported once, and other senders go on being served."""

from __future__ import annotations

import logging

import pytest
import torch

from tessera.afd.dataplane import HEADER_TAG, PAYLOAD_TAG, RESULT_TAG, TransferError
from tessera.afd.ffn_requests import RequestLimits
from tessera.afd.ffn_worker import serve
from tessera.afd.trace import Tracer

D = 8
LIMITS = RequestLimits(num_attention=2, micro_batches=2, max_tokens=16, max_head_rows=4,
                       top_k=[0, 2, 0], num_layers=2, num_experts=4)


def test_every_field_is_bounded():
    good = [1, 0, 1, 16, 0]
    assert LIMITS.check(1, good) is None
    assert LIMITS.check(1, [1, 1, 0, 3, 2]) is None  # the MoE layer
    assert LIMITS.check(0, [0, 2, 0, 4, 0]) is None  # the LM head's slice
    bad = {
        "claiming rank 0": (1, [0, 0, 0, 1, 0]),
        "from rank 2": (2, [2, 0, 0, 1, 0]),
        "layer 3 out of range": (1, [1, 3, 0, 1, 0]),
        "layer -1 out of range": (1, [1, -1, 0, 1, 0]),
        "micro-batch 2 out of range": (1, [1, 0, 2, 1, 0]),
        "17 tokens for layer 0": (1, [1, 0, 0, 17, 0]),
        "0 tokens": (1, [1, 0, 0, 0, 0]),
        "5 tokens for layer 2": (1, [1, 2, 0, 5, 0]),  # more rows than a step samples
        "top_k 0 for layer 1": (1, [1, 1, 0, 1, 0]),
        "top_k 3 for layer 0": (1, [1, 0, 0, 1, 3]),
        "4 fields": (1, [1, 0, 0, 1]),
    }
    for fragment, (src, header) in bad.items():
        why = LIMITS.check(src, header)
        assert why is not None and fragment in why, (fragment, why)
    assert LIMITS.check_expert_ids(torch.tensor([[0, 3]])) is None
    assert "expert ids" in (LIMITS.check_expert_ids(torch.tensor([[0, 4]])) or "")
    assert "expert ids" in (LIMITS.check_expert_ids(torch.tensor([[-1, 0]])) or "")


class _Plane:
    """Requests in arrival order (src, header, payload); a receive of a header with none left
    ends ``serve`` as a failed transfer would."""

    rank = 2
    names = ["attn0", "attn1", "ffn0"]

    def __init__(self, requests: list) -> None:
        self.requests = list(requests)
        self.payloads: dict[int, list[torch.Tensor]] = {0: [], 1: []}
        self.sent: list[tuple[int, int, torch.Tensor]] = []

    def recv_any(self, header: torch.Tensor, tag: int) -> int:
        assert tag == HEADER_TAG
        if not self.requests:
            raise TransferError("no more requests")
        src, fields, payload = self.requests.pop(0)
        header.copy_(torch.tensor(fields))
        self.payloads[src].append(payload)
        return src

    def poll_any(self, header: torch.Tensor, tag: int) -> int | None:
        return None

    def recv(self, tensor: torch.Tensor, src: int, tag: int, deadline_s: float) -> None:
        assert tag == PAYLOAD_TAG
        tensor.copy_(self.payloads[src].pop(0))

    def isend(self, tensor: torch.Tensor, dst: int, tag: int):
        self.sent.append((dst, tag, tensor))
        return _Done()


class _Done:
    def is_completed(self) -> bool:
        return True

    def wait(self, timeout=None) -> bool:
        return True


class _Double(torch.nn.Module):
    def forward(self, normed, topk_ids=None, topk_weights=None):
        return 2 * normed


def test_a_forged_header_is_dropped_before_any_allocation(caplog):
    x = torch.ones(3, D)
    plane = _Plane([
        (1, [1, 0, 1, 3, 0], x),  # served
        # Forged: a trillion tokens. Allocating them would fail; it must not be tried.
        (0, [0, 0, 0, 10**12, 0], x),
        (0, [0, 0, 0, 3, 0], x),  # a well-formed header, but attn0's stream is now suspect
        (1, [1, 0, 0, 3, 0], 3 * x),  # attn1 goes on being served
    ])
    reports: list[str] = []
    caplog.set_level(logging.WARNING, logger="tessera.afd.frames")
    with pytest.raises(TransferError, match="no more requests"):
        serve(plane, [_Double(), _Double(), _Double()], 2, D, torch.float32,
              torch.device("cpu"), 1.0, Tracer(False), LIMITS, on_bad_request=reports.append)
    assert [(dst, tag) for dst, tag, _ in plane.sent] == [(1, RESULT_TAG + 1), (1, RESULT_TAG)]
    torch.testing.assert_close(plane.sent[1][2], 6 * x)
    assert reports == ["malformed FFN request from attn0: 1000000000000 tokens for layer 0 "
                       "(at most 16)"]
    assert len(caplog.records) == 2  # the malformed request, then those after it
