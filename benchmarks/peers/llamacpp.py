"""llama.cpp as a benchmark peer, driven through llama-cpp-python's low-level ``llama_cpp`` API.

Install (builds llama.cpp from source for this CPU; about 4.5 minutes on 2 cores)::

    CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 \\
        .venv/bin/pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36 sentencepiece

(``sentencepiece`` is imported by llama.cpp's HF->GGUF converter.) The converter itself is not
part of the installed wheel: ``convert_to_gguf`` fetches the matching llama-cpp-python sdist
from PyPI once into ``.bench/llama-cpp-python/`` and runs ``vendor/llama.cpp/convert_hf_to_gguf.py``
from it, with the vendored ``gguf`` package.

CLI::

    python benchmarks/peers/llamacpp.py --hf-dir .bench/models/llama-100m --threads 2 --parallel 32

Shared machines: llama.cpp's CPU threads meet at OpenMP barriers that spin by default. When
another process holds one of the cores, a 2-thread decode step then slows down ~10x (measured
here: 1.9 vs 22.6 tokens/s at batch 1). The CLI therefore sets ``OMP_WAIT_POLICY=PASSIVE``
unless told otherwise (``--omp-wait-policy``); it must be in the environment before llama_cpp
is first imported. Use the same setting for every engine in one comparison (PyTorch's OpenMP
reads it too). Each result also carries ``cpu_share`` and ``loadavg_1m`` to flag busy runs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # executed as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.peers import CpuMeter, Workload, make_workload, summarize

LLAMACPP_VERSION = "0.3.36"
INSTALL_COMMAND = (
    'CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 .venv/bin/pip install '
    f"--no-binary llama-cpp-python llama-cpp-python=={LLAMACPP_VERSION} sentencepiece"
)
REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".bench"

# ggml log levels (ggml.h): keep only warnings and errors from the C library.
_GGML_LOG_LEVEL_WARN = 3
_GGML_LOG_LEVEL_CONT = 5
# Token id used for warm-up decodes (a plain token in the benchmark tokenizers).
WARMUP_TOKEN_ID = 300
_log_callback_ref: Any = None
_backend_ready = False


def ensure_llamacpp() -> None:
    """Raise a one-line ``RuntimeError`` with the install command if llama_cpp is missing."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"llama-cpp-python is not installed; run `make bench-deps` or: {INSTALL_COMMAND}"
        ) from exc


def llamacpp_version() -> str:
    """Installed llama-cpp-python version."""
    ensure_llamacpp()
    import llama_cpp

    return str(llama_cpp.__version__)


# ----------------------------------------------------------------------------- conversion


def _sdist_version() -> str:
    try:
        return llamacpp_version()
    except RuntimeError:
        return LLAMACPP_VERSION


def converter_dir(version: str | None = None) -> Path:
    """Directory holding llama.cpp's ``convert_hf_to_gguf.py`` for ``version``, fetched if absent.

    Downloads the llama-cpp-python sdist from PyPI (``pip download --no-binary``) into
    ``.bench/llama-cpp-python/`` and extracts only the converter, its ``conversion`` package and
    the vendored ``gguf-py``.
    """
    version = version or _sdist_version()
    base = CACHE_DIR / "llama-cpp-python"
    root = base / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").is_file() and (root / "gguf-py").is_dir():
        return root
    base.mkdir(parents=True, exist_ok=True)
    sdist = base / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={version}",
                "-d",
                str(base),
            ],
            check=True,
        )
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    wanted = (prefix + "convert_hf_to_gguf.py", prefix + "conversion/", prefix + "gguf-py/")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
        tar.extractall(base, members=members, filter="data")
    return root


# Runs the converter in a child process. If the tokenizer is a byte-level BPE whose pre-tokenizer
# hash llama.cpp does not know (true of every self-trained tokenizer), fall back to the "default"
# pre-tokenizer instead of aborting; Llama-family byte-fallback tokenizers never reach this path.
_CONVERT_RUNNER = """
import runpy, sys
root = sys.argv.pop(1)
sys.path[0:0] = [root, root + "/gguf-py"]
from conversion import base

_orig = base.TextModel.get_vocab_base_pre

def _get_vocab_base_pre(self, tokenizer):
    try:
        return _orig(self, tokenizer)
    except NotImplementedError:
        return "default"

base.TextModel.get_vocab_base_pre = _get_vocab_base_pre
sys.argv[0] = root + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert_to_gguf(hf_dir: str, out_path: str, outtype: str = "f32") -> str:
    """Convert a Hugging Face model directory to GGUF with llama.cpp's converter.

    ``outtype`` is one of the converter's types (``f32``, ``f16``, ``bf16``, ``q8_0``). Skips the
    conversion when ``out_path`` exists and is newer than every file in ``hf_dir``. Returns
    ``out_path``.
    """
    out = Path(out_path)
    src = Path(hf_dir)
    if out.is_file():
        newest_src_s = max(p.stat().st_mtime for p in src.iterdir() if p.is_file())
        if out.stat().st_mtime > newest_src_s:
            return str(out)
    root = converter_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    cmd = [
        sys.executable,
        "-c",
        _CONVERT_RUNNER,
        str(root),
        str(src),
        "--outfile",
        str(tmp),
        "--outtype",
        outtype,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"GGUF conversion of {hf_dir} failed:\n{tail}")
    tmp.replace(out)
    return str(out)


# ----------------------------------------------------------------------------- runtime


def _init_backend() -> None:
    """Initialise llama.cpp once and silence its info logging."""
    global _backend_ready, _log_callback_ref
    if _backend_ready:
        return
    ensure_llamacpp()
    import llama_cpp as lc

    def _log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        if _GGML_LOG_LEVEL_WARN <= level < _GGML_LOG_LEVEL_CONT:
            sys.stderr.write(text.decode("utf-8", errors="replace"))

    _log_callback_ref = lc.llama_log_callback(_log)
    lc.llama_log_set(_log_callback_ref, ctypes.c_void_p(0))
    lc.llama_backend_init()
    _backend_ready = True


@dataclass
class _Engine:
    """A loaded model + context + reusable batch (owned C objects, freed by ``close``)."""

    model: Any
    ctx: Any
    batch: Any
    n_vocab: int
    n_batch: int
    memory: Any = field(default=None)

    def close(self) -> None:
        import llama_cpp as lc

        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)


def _open(
    gguf_path: str,
    n_ctx: int,
    n_seq_max: int,
    n_threads: int,
    n_batch: int,
    n_ubatch: int,
    kv_unified: bool,
    flash_attn: bool | None,
) -> _Engine:
    _init_backend()
    import llama_cpp as lc

    mparams = lc.llama_model_default_params()
    model = lc.llama_model_load_from_file(gguf_path.encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf_path}")
    cparams = lc.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = n_batch
    cparams.n_ubatch = min(n_ubatch, n_batch)
    cparams.n_seq_max = n_seq_max
    cparams.n_threads = n_threads
    cparams.n_threads_batch = n_threads
    cparams.kv_unified = kv_unified
    cparams.no_perf = True
    if flash_attn is None:
        cparams.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_AUTO
    elif flash_attn:
        cparams.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
    else:
        cparams.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = lc.llama_init_from_model(model, cparams)
    if not ctx:
        lc.llama_model_free(model)
        raise RuntimeError("llama.cpp could not create a context (n_ctx too large?)")
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    batch = lc.llama_batch_init(n_batch, 0, 1)
    return _Engine(model, ctx, batch, n_vocab, n_batch, lc.llama_get_memory(ctx))


def _decode(engine: _Engine, entries: list[tuple[int, int, int, bool]]) -> None:
    """Decode one batch of (token, position, seq id, wants logits) entries."""
    import llama_cpp as lc

    batch = engine.batch
    for i, (token, pos, seq_id, wants_logits) in enumerate(entries):
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = wants_logits
    batch.n_tokens = len(entries)
    status = lc.llama_decode(engine.ctx, batch)
    if status != 0:
        raise RuntimeError(f"llama_decode failed with status {status}")


def _clear_memory(engine: _Engine) -> None:
    """Drop every sequence's KV (``llama_memory_clear``)."""
    import llama_cpp as lc

    lc.llama_memory_clear(engine.memory, True)


def _argmax(engine: _Engine, batch_index: int) -> int:
    """Greedy token from the logits of batch entry ``batch_index``."""
    import llama_cpp as lc
    import numpy as np

    ptr = lc.llama_get_logits_ith(engine.ctx, batch_index)
    return int(np.ctypeslib.as_array(ptr, shape=(engine.n_vocab,)).argmax())


def _slot_context_tokens(requests: Workload) -> int:
    """Per-sequence KV capacity: the longest request (prompt + outputs), padded to 256."""
    longest = max(len(prompt) + num_out for prompt, num_out in requests)
    return -(-longest // 256) * 256


@dataclass
class _Slot:
    seq_id: int
    request_index: int = -1
    prompt: list[int] = field(default_factory=list)
    num_prompt_fed: int = 0
    num_output_wanted: int = 0
    num_output_done: int = 0
    last_token: int = 0

    @property
    def busy(self) -> bool:
        return self.request_index >= 0

    @property
    def prefilling(self) -> bool:
        return self.num_prompt_fed < len(self.prompt)


def _run_continuous(
    engine: _Engine,
    requests: Workload,
    n_parallel: int,
    outputs: list[list[int]] | None = None,
) -> int:
    """Serve ``requests`` with continuous batching; returns the number of llama_decode calls.

    Each step builds one llama_batch of at most n_batch tokens: first one token for every
    sequence that is decoding, then prompt chunks of sequences still prefilling (chunked
    prefill, logits only on the last prompt token). A finished sequence frees its slot (its KV
    is removed with ``llama_memory_seq_rm``) and the next queued request takes it. When
    ``outputs`` is given, request i's generated ids are appended to ``outputs[i]``.
    """
    import llama_cpp as lc

    slots = [_Slot(seq_id=i) for i in range(n_parallel)]
    next_request = 0
    num_done = 0
    num_steps = 0
    while num_done < len(requests):
        for slot in slots:
            if not slot.busy and next_request < len(requests):
                prompt, num_out = requests[next_request]
                lc.llama_memory_seq_rm(engine.memory, slot.seq_id, -1, -1)
                slot.request_index = next_request
                slot.prompt = prompt
                slot.num_prompt_fed = 0
                slot.num_output_wanted = num_out
                slot.num_output_done = 0
                next_request += 1
        entries: list[tuple[int, int, int, bool]] = []
        sampled: list[tuple[_Slot, int]] = []  # (slot, batch index of its logits)
        for slot in slots:
            if slot.busy and not slot.prefilling:
                pos = len(slot.prompt) + slot.num_output_done - 1
                sampled.append((slot, len(entries)))
                entries.append((slot.last_token, pos, slot.seq_id, True))
        for slot in slots:
            budget = engine.n_batch - len(entries)
            if budget <= 0:
                break
            if slot.busy and slot.prefilling:
                start = slot.num_prompt_fed
                stop = min(len(slot.prompt), start + budget)
                for pos in range(start, stop):
                    last = pos == len(slot.prompt) - 1
                    if last:
                        sampled.append((slot, len(entries)))
                    entries.append((slot.prompt[pos], pos, slot.seq_id, last))
                slot.num_prompt_fed = stop
        _decode(engine, entries)
        num_steps += 1
        for slot, batch_index in sampled:
            slot.last_token = _argmax(engine, batch_index)  # EOS is ignored on purpose
            if outputs is not None:
                outputs[slot.request_index].append(slot.last_token)
            slot.num_output_done += 1
            if slot.num_output_done >= slot.num_output_wanted:
                lc.llama_memory_seq_rm(engine.memory, slot.seq_id, -1, -1)
                slot.request_index = -1
                slot.prompt = []
                num_done += 1
    return num_steps


def bench_batched(
    gguf_path: str,
    requests: Workload,
    n_threads: int,
    n_parallel: int,
    n_batch: int = 2048,
    n_ubatch: int = 512,
    kv_unified: bool = False,
    flash_attn: bool | None = None,
) -> dict[str, Any]:
    """llama.cpp batched throughput with up to ``n_parallel`` sequences decoding at once.

    Requests are admitted in order as slots free up (continuous batching); every request emits
    exactly its output count (greedy, EOS ignored; the first output token comes from the last
    prompt position's logits). ``n_ctx`` is n_parallel x the longest request (padded to 256),
    i.e. the sum over parallel slots.

    ``kv_unified=False`` (llama.cpp's default) gives each sequence its own KV stream, so a
    sequence's attention reads only its own cells; with one shared (unified) buffer every
    sequence attends over the whole buffer with a mask, which is slower here because the
    requests share no prefix (``--compare-kv`` in the CLI; on 2 threads, 64 requests of
    32..1024 prompt / 16..256 output tokens at n_parallel 32 took 299 s split vs 534 s unified).

    Returns wall seconds, token totals and throughput (``summarize``), plus the settings.
    """
    n_parallel = max(1, min(n_parallel, len(requests)))
    slot_tokens = _slot_context_tokens(requests)
    n_ctx = slot_tokens * n_parallel
    engine = _open(
        gguf_path, n_ctx, n_parallel, n_threads, n_batch, n_ubatch, kv_unified, flash_attn
    )
    try:
        # Warm-up: one short request per slot shape, then clear every sequence.
        _run_continuous(engine, [([WARMUP_TOKEN_ID] * 8, 2)] * min(2, n_parallel), n_parallel)
        _clear_memory(engine)
        meter = CpuMeter(n_threads)
        start_s = time.perf_counter()
        num_steps = _run_continuous(engine, requests, n_parallel)
        wall_s = time.perf_counter() - start_s
        cpu = meter.stop()
        _clear_memory(engine)
    finally:
        engine.close()
    return summarize(
        wall_s,
        sum(len(prompt) for prompt, _ in requests),
        sum(num_out for _, num_out in requests),
        engine="llama.cpp",
        n_parallel=n_parallel,
        n_threads=n_threads,
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        kv_unified=kv_unified,
        flash_attn=flash_attn,
        num_decode_calls=num_steps,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""),
        **cpu,
    )


def generate_greedy(
    gguf_path: str,
    requests: Workload,
    n_threads: int,
    n_parallel: int,
    kv_unified: bool = False,
    n_batch: int = 2048,
) -> list[list[int]]:
    """Greedy output ids per request from the same continuous-batching loop (for checks)."""
    n_parallel = max(1, min(n_parallel, len(requests)))
    n_ctx = _slot_context_tokens(requests) * n_parallel
    engine = _open(gguf_path, n_ctx, n_parallel, n_threads, n_batch, 512, kv_unified, None)
    outputs: list[list[int]] = [[] for _ in requests]
    try:
        _run_continuous(engine, requests, n_parallel, outputs)
    finally:
        engine.close()
    return outputs


def bench_decode_batch1(
    gguf_path: str,
    prompt_ids: list[int],
    num_output_tokens: int,
    n_threads: int,
    n_batch: int = 2048,
    flash_attn: bool | None = None,
) -> dict[str, Any]:
    """Single-sequence greedy decode speed, excluding prefill.

    Prefills ``prompt_ids`` (chunks of ``n_batch``), then times ``num_output_tokens`` one-token
    decode steps (EOS ignored). Returns ``decode_tokens_per_s``, ``decode_s``, ``prefill_s`` and
    ``prefill_tokens_per_s``.
    """
    n_ctx = -(-(len(prompt_ids) + num_output_tokens + 1) // 256) * 256
    engine = _open(gguf_path, n_ctx, 1, n_threads, n_batch, 512, False, flash_attn)
    try:
        _decode(engine, [(WARMUP_TOKEN_ID + i, i, 0, i == 7) for i in range(8)])
        _argmax(engine, 7)
        _clear_memory(engine)
        start_s = time.perf_counter()
        token = 0
        for chunk_start in range(0, len(prompt_ids), n_batch):
            chunk = prompt_ids[chunk_start : chunk_start + n_batch]
            last_chunk = chunk_start + len(chunk) == len(prompt_ids)
            entries = [
                (tok, chunk_start + i, 0, last_chunk and i == len(chunk) - 1)
                for i, tok in enumerate(chunk)
            ]
            _decode(engine, entries)
            if last_chunk:
                token = _argmax(engine, len(entries) - 1)
        prefill_s = time.perf_counter() - start_s
        meter = CpuMeter(n_threads)
        start_s = time.perf_counter()
        pos = len(prompt_ids)
        for _ in range(num_output_tokens):
            _decode(engine, [(token, pos, 0, True)])
            token = _argmax(engine, 0)
            pos += 1
        decode_s = time.perf_counter() - start_s
        cpu = meter.stop()
    finally:
        engine.close()
    return {
        "engine": "llama.cpp",
        "num_prompt_tokens": len(prompt_ids),
        "num_output_tokens": num_output_tokens,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": len(prompt_ids) / prefill_s,
        "decode_s": decode_s,
        "decode_tokens_per_s": num_output_tokens / decode_s,
        "n_threads": n_threads,
        "flash_attn": flash_attn,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        **cpu,
    }


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    """CLI: build/convert the model if needed, then print batch-1 and batched figures."""
    parser = argparse.ArgumentParser(description="llama.cpp peer benchmark")
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model directory")
    parser.add_argument("--gguf", help="GGUF path (default: <hf-dir>-<outtype>.gguf)")
    parser.add_argument("--outtype", default="f32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, nargs="+", default=[32])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=1024)
    parser.add_argument("--min-output", type=int, default=16)
    parser.add_argument("--max-output", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-batch", type=int, default=2048)
    parser.add_argument("--batch1-prompt", type=int, default=128)
    parser.add_argument("--batch1-output", type=int, default=128)
    parser.add_argument("--skip-batch1", action="store_true")
    parser.add_argument("--skip-batched", action="store_true")
    parser.add_argument(
        "--compare-kv", action="store_true", help="also run kv_unified=True for comparison"
    )
    parser.add_argument(
        "--flash-attn", choices=["auto", "on", "off"], default="auto", help="flash attention"
    )
    parser.add_argument(
        "--omp-wait-policy",
        choices=["passive", "active", "unset"],
        default="passive",
        help="OMP_WAIT_POLICY for llama.cpp's threads (unset: leave the environment alone)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines only")
    args = parser.parse_args(argv)
    if args.omp_wait_policy != "unset":
        if "llama_cpp" in sys.modules:
            raise RuntimeError("set OMP_WAIT_POLICY before llama_cpp is imported")
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()

    ensure_llamacpp()
    gguf = args.gguf or f"{args.hf_dir.rstrip('/')}-{args.outtype}.gguf"
    convert_to_gguf(args.hf_dir, gguf, args.outtype)
    vocab_size = int(json.loads((Path(args.hf_dir) / "config.json").read_text())["vocab_size"])
    flash_attn = {"auto": None, "on": True, "off": False}[args.flash_attn]

    def report(label: str, result: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps({"label": label, **result}), flush=True)
            return
        figures = ", ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
        )
        print(f"{label}: {figures}", flush=True)

    if not args.json:
        print(f"llama-cpp-python {llamacpp_version()}, model {gguf}", flush=True)
    if not args.skip_batch1:
        prompt = make_workload(1, args.batch1_prompt, args.batch1_prompt, 1, 1, vocab_size)[0][0]
        result = bench_decode_batch1(
            gguf, prompt, args.batch1_output, args.threads, args.n_batch, flash_attn
        )
        report("batch1", result)
    if not args.skip_batched:
        requests = make_workload(
            args.num_requests,
            args.min_prompt,
            args.max_prompt,
            args.min_output,
            args.max_output,
            vocab_size,
            args.seed,
        )
        for n_parallel in args.parallel:
            for kv_unified in (False, True) if args.compare_kv else (False,):
                result = bench_batched(
                    gguf,
                    requests,
                    args.threads,
                    n_parallel,
                    n_batch=args.n_batch,
                    kv_unified=kv_unified,
                    flash_attn=flash_attn,
                )
                report(f"batched n_parallel={n_parallel} kv_unified={kv_unified}", result)


if __name__ == "__main__":
    main()
