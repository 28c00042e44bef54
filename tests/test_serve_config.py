"""Which models ``tessera serve`` serves, from its command line and ``--config`` file, and the
one-line errors of a bad one (in-process: nothing is started)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from tessera.config import EngineConfig
from tessera.engine_args import engine_config
from tessera.serve.cli import add_serve_parser
from tessera.serve.config import ServeConfig, ServedModel
from tessera.serve.served_models import served_models_from_args


def _models(*argv: str) -> tuple[ServedModel, ...]:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    return served_models_from_args(parser.parse_args(["serve", *argv]))


def _model_dir(path: Path) -> str:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")  # nothing loads it here
    return str(path)


def _toml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_one_model_as_before(tmp_path):
    path = _model_dir(tmp_path / "my-model")
    (model,) = _models(path, "--threads", "3", "--max-num-seqs", "8")
    assert model == ServedModel("my-model", engine_config(path, num_threads=3, max_num_seqs=8),
                                aliases=(path,))  # fmt: skip
    (model,) = _models(path, "--served-model-name", "chat")
    assert model.name == "chat" and model.aliases == () and model.engine == EngineConfig(path)


def test_several_models_from_flags_and_a_config_file(tmp_path):
    first = _model_dir(tmp_path / "first")
    second = _model_dir(tmp_path / "second")
    _model_dir(tmp_path / "conf" / "third")
    config = _toml(tmp_path / "conf" / "models.toml", """
[models."org/third"]
path = "third"                 # relative to the file
max_num_seqs = 4
kv_cache_memory_fraction = 1   # an integer is a float too
enable_prefix_caching = false
""")  # fmt: skip
    models = _models(first, "--model", f"two={second}", "--config", config,
                     "--max-num-seqs", "16", "--dtype", "float32")  # fmt: skip
    assert [m.name for m in models] == ["first", "two", "org/third"]
    third = models[2].engine
    assert third.model == str(tmp_path / "conf" / "third")
    # The command line's options are every model's defaults; a model's table overrides them.
    assert third.scheduler.max_num_seqs == 4 and models[1].engine.scheduler.max_num_seqs == 16
    assert not third.cache.enable_prefix_caching and models[0].engine.cache.enable_prefix_caching
    assert third.cache.kv_cache_memory_fraction == 1 and third.dtype == "float32"
    # Without a thread count, the cores share the CPUs out.
    share = max(1, len(os.sched_getaffinity(0)) // 3)
    assert {m.engine.num_threads for m in models} == {share}
    models = _models("--model", f"a={first}", "--model", f"b={second}", "--threads", "1")
    assert {m.engine.num_threads for m in models} == {1}


@pytest.mark.parametrize(("argv", "table", "fragment"), [
    ([], None, "no model to serve"),
    (["--served-model-name", "x", "--model", "a=M"], None, "--served-model-name names"),
    (["--model", "M"], None, "--model takes NAME=PATH"),
    (["--model", "a=M", "--model", "a=M"], None, "the model name 'a' is given twice"),
    (["--model", "a=NOWHERE"], None, "model 'a': 'NOWHERE' is not a model directory"),
    (["--model", "a=M", "--max-num-seqs", "0"], None, "model 'a': max_num_seqs must be at"),
    ([], 'models = 1', "no [models.NAME] table"),
    ([], '[model.a]\npath = "M"', "unknown table or key 'model'"),
    ([], '[models.a]\nmax_num_seqs = 2', "model 'a' needs path"),
    ([], '[models]\na = 1', "models.a must be a table"),
    ([], '[models.a]\npath = "M"\nmax_num_seq = 2', "model 'a': unknown engine option "
                                                    "'max_num_seq'"),
    ([], '[models.a]\npath = "M"\nmodel = "M"', "unknown engine option 'model'"),
    ([], '[models.a]\npath = "M"\nmax_num_seqs = "2"', "'max_num_seqs' must be of type int"),
    ([], '[models.a]\npath = "M"\nmax_num_seqs = true', "'max_num_seqs' must be of type int"),
    ([], '[models.a]\npath = "M"\nenable_prefix_caching = 1', "must be of type bool"),
    ([], '[models.a]\npath = "M"\nmax_num_seqs = 0', "model 'a': max_num_seqs must be at"),
    ([], '[models.a]\npath = "M"\nmicro_batches = 2', "model 'a': micro_batches needs"),
    ([], '[models.a\npath = "M"', "--config"),
])  # fmt: skip
def test_bad_models_are_one_line_naming_them(tmp_path, argv, table, fragment):
    model = _model_dir(tmp_path / "M")
    argv = [a.replace("=M", f"={model}") for a in argv]
    if table is not None:
        argv += ["--config", _toml(tmp_path / "m.toml", table.replace('"M"', json.dumps(model)))]
    with pytest.raises(ValueError) as e:
        _models(*argv)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_an_unreadable_config_file_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="cannot read --config"):
        _models("--config", str(tmp_path / "missing.toml"))


def test_model_ids_are_unique_across_names_and_aliases(tmp_path):
    engine = EngineConfig("m")
    with pytest.raises(ValueError, match="'x' is given to two models"):
        ServeConfig(models=(ServedModel("a", engine, ("x",)), ServedModel("x", engine)))
    with pytest.raises(ValueError, match="non-empty"):
        ServedModel(" a", engine)


def test_a_model_table_may_set_its_tool_and_reasoning_parsers(tmp_path):
    _model_dir(tmp_path / "a")
    _model_dir(tmp_path / "b")
    config = _toml(tmp_path / "models.toml", """
[models.qwen]
path = "a"
tool_call_parser = "qwen3"
reasoning_parser = "qwen3"

[models.plain]
path = "b"
""")
    qwen, plain = _models("--config", config)
    assert (qwen.tool_call_parser, qwen.reasoning_parser) == ("qwen3", "qwen3")
    assert (plain.tool_call_parser, plain.reasoning_parser) == (None, None)
    bad = _toml(tmp_path / "bad.toml", '[models.x]\npath = "a"\ntool_call_parser = "nope"\n')
    with pytest.raises(ValueError, match="model 'x'.*unknown tool-call parser 'nope'"):
        _models("--config", bad)
    bad = _toml(tmp_path / "bad2.toml", '[models.x]\npath = "a"\nreasoning_parser = 3\n')
    with pytest.raises(ValueError, match="reasoning_parser must be a string"):
        _models("--config", bad)
