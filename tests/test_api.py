"""The LLM interface, request lifecycle, loader errors and the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from tessera import LLM, SamplingParams
from tessera.engine.llm_engine import LLMEngine
from tessera.model.loader import ModelLoadError
from tests.models import build_model, reference_gaps

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_text_and_token_prompts_agree(device, model_factory):
    path, _ = model_factory("llama")
    llm = LLM(str(path), dtype="float32", device=device, kv_cache_memory=4 << 20)
    tok = llm.get_tokenizer()
    by_text = llm.generate(["abc def"], GREEDY, use_tqdm=False)[0]
    by_ids = llm.generate([tok.encode("abc def")], GREEDY, use_tqdm=False)[0]
    assert by_text.prompt_token_ids == by_ids.prompt_token_ids
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_text.outputs[0].text == tok.decode(by_text.outputs[0].token_ids,
                                                 skip_special_tokens=True)
    assert by_text.prompt == "abc def" and by_ids.prompt is None


def test_model_without_tokenizer(device, tmp_path):
    path, hf = build_model("llama", tmp_path / "m", tokenizer=False)
    llm = LLM(str(path), dtype="float32", device=device, kv_cache_memory=4 << 20)
    out = llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0]
    assert max(reference_gaps(hf, [5, 6, 7], out.outputs[0].token_ids)) <= 1e-4
    assert out.outputs[0].text == ""
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate(["hello"], GREEDY, use_tqdm=False)
    # The failed call left nothing behind.
    assert not llm.engine.has_unfinished_requests()


def test_bad_prompts_and_param_lists(device, model_factory):
    path, _ = model_factory("llama")
    llm = LLM(str(path), dtype="float32", device=device, kv_cache_memory=4 << 20,
              max_model_len=64)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        llm.generate([[1, 300]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="maximum context length is 64"):
        llm.generate([[1] * 64], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        llm.generate([[1]], [GREEDY, GREEDY], use_tqdm=False)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.runtime.num_kv_blocks
    # Generation stops at the context length with finish_reason "length".
    out = llm.generate([[1] * 60], SamplingParams(temperature=0, max_tokens=None,
                                                  ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == "length"


def test_abort_mid_generation_frees_blocks(device, model_factory):
    path, hf = model_factory("llama")
    llm = LLM(str(path), dtype="float32", device=device, kv_cache_memory=4 << 20,
              max_num_batched_tokens=32)
    engine: LLMEngine = llm.engine
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine.add_request("keep", [4, 5, 6, 7], long)
    engine.add_request("mid-prefill", list(range(100)), long)
    engine.add_request("decoding", [9, 8, 7], long)
    engine.add_request("waiting", [1, 2], long)
    engine.step()  # prefills keep, decoding and a chunk of mid-prefill
    engine.step()
    assert engine.abort_request("mid-prefill") and engine.abort_request("decoding")
    assert engine.abort_request("waiting")
    assert not engine.abort_request("waiting") and not engine.abort_request("unknown")
    done = []
    while engine.has_unfinished_requests():
        done += engine.step()
    assert [o.request_id for o in done] == ["keep"]
    assert max(reference_gaps(hf, [4, 5, 6, 7], done[0].outputs[0].token_ids)) <= 1e-4
    assert engine.block_manager.num_free_blocks == engine.runtime.num_kv_blocks


@pytest.fixture()
def model_copy(model_factory, tmp_path):
    path, _ = model_factory("llama")
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def _load(path):
    return LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=1 << 20)


def test_loader_errors_name_the_problem(model_copy, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        _load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        _load(tmp_path / "empty")
    weights = load_file(str(model_copy / "model.safetensors"))
    w = dict(weights)
    del w["model.layers.1.mlp.up_proj.weight"]
    save_file(w, str(model_copy / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"layers\.1\.ffn\.gate_up_proj\.weight.*missing"):
        _load(model_copy)
    w = dict(weights)
    w["model.layers.0.self_attn.k_proj.weight"] = w["model.layers.0.self_attn.q_proj.weight"].clone()
    save_file(w, str(model_copy / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"k_proj.weight' has shape \(64, 64\), expected"):
        _load(model_copy)
    w = dict(weights)
    w["model.layers.0.mystery.weight"] = w["model.norm.weight"].clone()
    save_file(w, str(model_copy / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="unexpected tensor 'model.layers.0.mystery"):
        _load(model_copy)
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'GPT2LMHeadModel'"):
        _load(model_copy)


def test_sharded_checkpoint_loads(model_factory, tmp_path):
    path, hf = model_factory("qwen2")
    dst = tmp_path / "sharded"
    hf.save_pretrained(str(dst), max_shard_size="40KB")
    assert (dst / "model.safetensors.index.json").is_file()
    llm = LLM(str(dst), dtype="float32", device="cpu", kv_cache_memory=1 << 20)
    out = llm.generate([[3, 1, 4]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert max(reference_gaps(hf, [3, 1, 4], out)) <= 1e-4


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tessera.cli", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.processes
def test_cli_generate(model_factory):
    path, _ = model_factory("llama")
    llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=4 << 20)
    want = llm.generate(["Hi"], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    r = _cli("generate", str(path), "--prompt", "Hi", "--max-tokens", "5", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want[0].outputs[0].text + "\n"


@pytest.mark.processes
def test_cli_errors_are_one_line(tmp_path, model_factory):
    r = _cli("generate", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    path, _ = model_factory("llama")
    r = _cli("generate", str(path), "--prompt", "x", "--temperature", "-1")
    assert r.returncode == 2 and "temperature" in r.stderr and "Traceback" not in r.stderr


def test_warm_up_leaves_no_trace(model_factory):
    path, _ = model_factory("llama")
    llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=4 << 20)
    engine = llm.engine
    engine.warm_up()
    stats = engine.stats()
    assert stats.num_prompt_tokens_total == 0 and stats.num_generation_tokens_total == 0
    assert stats.num_prefix_queried_tokens_total == 0 and not engine.block_manager.cached
    assert engine.block_manager.num_free_blocks == engine.runtime.num_kv_blocks
    assert not engine.has_unfinished_requests()


def test_warm_up_runs_a_step_as_large_as_a_step_can_be(model_factory):
    # The largest step's activations set the host heap's size; warm-up must reach it.
    path, _ = model_factory("llama")
    llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=4 << 20)
    engine = llm.engine
    sizes = []
    schedule = engine.scheduler.schedule

    def record():
        out = schedule()
        sizes.append(out.num_batched_tokens)
        return out

    engine.scheduler.schedule = record
    engine.warm_up()
    largest = min(engine.config.scheduler.max_num_batched_tokens, engine.runtime.max_model_len - 1)
    assert largest > 2 and max(sizes) == largest


def test_readme_lists_every_engine_option_with_its_default():
    # The README's LLM option table is documentation of the config fields: it must name each
    # option of EngineConfig/SchedulerConfig/CacheConfig and agree with its default.
    import dataclasses
    import re
    from pathlib import Path

    from tessera.config import CacheConfig, ClusterConfig, EngineConfig, SchedulerConfig

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", readme, re.M))
    for cls in (EngineConfig, SchedulerConfig, CacheConfig, ClusterConfig):
        for f in dataclasses.fields(cls):
            if "help" not in f.metadata:
                continue
            assert f.name in rows, f"README's LLM option table lacks {f.name}"
            shown = rows[f.name].strip().strip("`")
            if f.default is None:
                assert shown in ("None", "model's", "torch's"), (f.name, shown)
            else:
                gib = (f"{f.default >> 30} GiB" if isinstance(f.default, int)
                       and f.default >= 1 << 30 and f.default % (1 << 30) == 0 else None)
                assert shown in (repr(f.default).replace("'", '"'), str(f.default), gib), (
                    f.name, shown, f.default)


def test_unknown_llm_option_is_a_type_error(model_factory):
    path, _ = model_factory("llama")
    with pytest.raises(TypeError, match="max_num_seq"):
        LLM(str(path), dtype="float32", device="cpu", max_num_seq=4)
    with pytest.raises(ValueError, match="micro_batches needs attention_workers"):
        LLM(str(path), dtype="float32", device="cpu", micro_batches=2)


def test_every_engine_option_is_a_flag_and_a_keyword():
    import argparse

    from tessera.cli_options import flag_of, option_names
    from tessera.config import AFDConfig, CacheConfig, EngineConfig, SchedulerConfig
    from tessera.engine_args import add_engine_args, engine_config, engine_config_from_args

    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    add_engine_args(parser)
    args = parser.parse_args(["m", "--max-num-seqs", "4", "--no-prefix-caching", "--threads",
                              "3", "--no-chunked-prefill", "--kv-cache-dtype", "bfloat16",
                              "--ffn-workers", "2", "--micro-batches", "3"])
    config = engine_config_from_args(args)
    assert config == engine_config(
        "m", max_num_seqs=4, enable_prefix_caching=False, num_threads=3,
        enable_chunked_prefill=False, kv_cache_dtype="bfloat16", ffn_workers=2,
        micro_batches=3)
    assert config.afd == AFDConfig(attention_workers=1, ffn_workers=2, micro_batches=3)
    # Defaults come from the dataclasses alone.
    plain = engine_config_from_args(parser.parse_args(["m"]))
    assert plain == EngineConfig(model="m") and plain.afd is None
    flags = {flag for action in parser._actions for flag in action.option_strings}
    for cls in (EngineConfig, SchedulerConfig, CacheConfig, AFDConfig):
        for name in option_names(cls):
            assert flag_of(cls, name) in flags, name
    with pytest.raises(ValueError, match="--micro-batches needs --attention-workers"):
        engine_config_from_args(parser.parse_args(["m", "--micro-batches", "2"]))
