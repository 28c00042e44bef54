"""``tessera bench serve`` against a test server, plus its datasets and summary."""

from __future__ import annotations

import json

import pytest

from tessera.bench.datasets import (
    BenchRequest,
    as_text_prompts,
    prefix_requests,
    random_requests,
    sharegpt_requests,
)
from tessera.bench.serve import RequestResult, bench_serve_main, summarize
from tests.test_serve_util import ServerProcess, build_server_model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(build_server_model(tmp_path_factory.mktemp("bench-model")))
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def test_datasets():
    reqs = random_requests(8, 10, 4, 0.5, 256, seed=1)
    assert all(5 <= len(r.prompt) <= 15 and 2 <= r.num_output_tokens <= 6 for r in reqs)
    assert reqs == random_requests(8, 10, 4, 0.5, 256, seed=1)
    reqs = prefix_requests(6, prefix_len=8, num_prefixes=2, input_len=3, output_len=2,
                           vocab_size=100, seed=0)  # fmt: skip
    assert reqs[0].prompt[:8] == reqs[2].prompt[:8] != reqs[1].prompt[:8]
    assert all(len(r.prompt) == 11 for r in reqs)


def test_summary_percentiles_and_goodput():
    results = [RequestResult(True, "", 10, 5, ttft_s=t, e2e_s=t + 0.4, itl_s=[0.1] * 4)
               for t in (0.1, 0.2, 0.3, 0.4)]  # fmt: skip
    results.append(RequestResult(False, "HTTP 500"))
    s = summarize(results, 2.0, {"ttft": 0.25})
    assert s["num_completed"] == 4 and s["num_failed"] == 1
    assert s["output_throughput"] == 10.0 and s["total_token_throughput"] == 30.0
    assert s["mean_tpot_ms"] == pytest.approx(100.0) and s["p50_ttft_ms"] == pytest.approx(250.0)
    assert s["goodput"] == 1.0 and s["errors"] == ["HTTP 500"]


@pytest.mark.processes
def test_bench_against_server(server, tmp_path, capsys):
    out = tmp_path / "result.json"
    rc = bench_serve_main([
        "--base-url", server.base_url, "--model", "tiny", "--num-prompts", "6",
        "--random-input-len", "16", "--random-output-len", "5", "--ignore-eos",
        "--max-concurrency", "3", "--request-rate", "50", "--goodput", "ttft:60000",
        "--json", str(out), "--no-progress",
    ])  # fmt: skip
    assert rc == 0
    summary = json.loads(out.read_text())["summary"]
    assert summary["num_completed"] == 6 and summary["num_failed"] == 0
    # Usage-based counts: exact prompt and output tokens.
    assert summary["num_input_tokens"] == 6 * 16 and summary["num_output_tokens"] == 6 * 5
    assert summary["goodput"] > 0
    assert "TTFT (ms)" in capsys.readouterr().out

    conversations = [
        {"conversations": [{"from": "human", "value": f"Question {i}?"},
                           {"from": "gpt", "value": "one two three"}]}
        for i in range(3)
    ]  # fmt: skip
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps(conversations))
    assert len(sharegpt_requests(str(data), 5, None, seed=0)) == 5
    rc = bench_serve_main([
        "--base-url", server.base_url, "--model", "tiny", "--dataset", "sharegpt",
        "--dataset-path", str(data), "--num-prompts", "4", "--no-progress",
        "--sharegpt-output-len", "4",
    ])  # fmt: skip
    assert rc == 0
    rc = bench_serve_main([
        "--base-url", server.base_url, "--model", "tiny", "--dataset", "prefix",
        "--prefix-len", "32", "--num-prefixes", "2", "--random-input-len", "4",
        "--random-output-len", "3", "--num-prompts", "4", "--no-progress",
        "--max-concurrency", "1",  # one at a time, so later prompts hit the cached prefix
    ])  # fmt: skip
    assert rc == 0
    assert server.metric("tessera:prefix_cache_hits_total") > 0


@pytest.mark.processes
def test_bench_reports_failures(server, capsys):
    rc = bench_serve_main(["--base-url", server.base_url, "--model", "wrong", "--num-prompts",
                           "2", "--random-input-len", "4", "--random-output-len", "2",
                           "--no-progress"])  # fmt: skip
    assert rc == 1
    assert "HTTP 404" in capsys.readouterr().out


def test_text_prompts_use_whole_word_pieces(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁hello": 1, "▁world": 2, "lo": 3, "▁": 4}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path)
    reqs = [BenchRequest([0, 1, 2, 7], 3), BenchRequest("already text", 2)]
    out = as_text_prompts(reqs, str(tmp_path))
    # ids pick among the whole-word pieces (ids 1 and 2) by position in that list
    assert out == [BenchRequest("hello world hello world", 3), BenchRequest("already text", 2)]
    fast = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert len(fast.encode(out[0].prompt, add_special_tokens=False)) == 4
