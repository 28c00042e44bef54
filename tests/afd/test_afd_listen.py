"""The torch data plane of a local pool (its rendezvous store and gloo's pairs) listens on the
loopback interface only, never on every interface."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tessera import LLM, SamplingParams
from tessera.config import AFDConfig

pytestmark = pytest.mark.processes

COMMON = dict(dtype="float32", device="cpu", kv_cache_memory=1 << 22, num_threads=1)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _listening(pid: int) -> list[str]:
    """The local addresses ``pid`` listens on for TCP, as hex ``ADDR:PORT`` from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN
                found.append(fields[1])
    return found


def test_a_local_torch_plane_listens_on_loopback_only(model_factory):
    path, _ = model_factory("llama")
    afd = AFDConfig(attention_workers=1, ffn_workers=2, data_plane="torch")
    llm = LLM(str(path), afd=afd, **COMMON)
    try:
        pids = [proc.pid for proc in llm.engine._pool.procs.values()]
        listening = {pid: _listening(pid) for pid in pids}
        assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    finally:
        llm.close()
    # Rank 0 serves the rendezvous store; every rank listens for gloo's pairs.
    assert all(listening.values()), listening
    loopback = "0100007F:"  # 127.0.0.1, as /proc/net/tcp writes it
    assert all(a.startswith(loopback) for addrs in listening.values() for a in addrs), listening
