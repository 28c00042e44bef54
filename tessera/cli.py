"""The ``tessera`` command line.

Errors a user can cause (a bad path, a bad value) end with one line on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time

from tessera.engine_args import add_engine_args, engine_config_from_args


def _build_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion for one prompt")
    p.add_argument("model", help="Hugging Face model directory")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as one user message through the model's chat template")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    add_engine_args(p)
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")


def _build_serve_parser(sub: argparse._SubParsersAction) -> None:
    try:
        from tessera.serve.cli import add_serve_parser
    except ImportError:  # the server's dependencies are not installed
        return
    add_serve_parser(sub)


def _chat_prompt_ids(model: str, text: str) -> list[int]:
    """Token ids of ``text`` as one user message rendered with the model's chat template."""
    from tessera.engine.detokenizer import load_tokenizer

    tok = load_tokenizer(model)
    if tok is None or not getattr(tok, "chat_template", None):
        raise ValueError(f"--chat needs a tokenizer with a chat_template in {model!r}")
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    # The template holds any special tokens itself; adding them again would double them.
    return list(tok.encode(rendered, add_special_tokens=False))


def _generate(args: argparse.Namespace) -> int:
    from tessera import LLM, SamplingParams

    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
    )
    chat_ids = _chat_prompt_ids(args.model, args.prompt) if args.chat else None
    llm = LLM.from_config(engine_config_from_args(args))
    try:
        start_s = time.perf_counter()
        if chat_ids is not None:
            out = llm.generate([chat_ids], params, use_tqdm=False)[0]
        else:
            out = llm.generate([args.prompt], params, use_tqdm=False)[0]
        elapsed_s = time.perf_counter() - start_s
    finally:
        llm.close()  # stops disaggregated workers and writes --trace
    print(out.outputs[0].text)
    if args.stats:
        num_out = len(out.outputs[0].token_ids)
        print(
            f"prompt {len(out.prompt_token_ids)} tokens, generated {num_out} tokens in "
            f"{elapsed_s:.2f} s ({num_out / elapsed_s:.1f} tokens/s)",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The simulator owns its own argument parsing.
    if argv and argv[0] in ("sim", "plan"):
        try:
            from tessera.sim.cli import plan_main, sim_main
        except ImportError as e:
            print(f"tessera: '{argv[0]}' is not available: {e}", file=sys.stderr)
            return 2
        return sim_main(argv[1:]) if argv[0] == "sim" else plan_main(argv[1:])

    if argv[:2] == ["bench", "serve"]:
        from tessera.bench.serve import bench_serve_main

        return bench_serve_main(argv[2:])

    parser = argparse.ArgumentParser(prog="tessera", description="Tessera LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    _build_generate_parser(sub)
    _build_serve_parser(sub)
    sub.add_parser("bench", help="benchmarks: 'tessera bench serve --help'")
    from tessera.kv.cli import add_kv_parser

    add_kv_parser(sub)
    try:
        from tessera.router.cli import add_router_parser

        add_router_parser(sub)
    except ImportError:  # the server's dependencies are not installed
        pass
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            from tessera.serve.cli import run_serve

            return run_serve(args)
        if args.command == "router":
            from tessera.router.cli import run_router

            return run_router(args)
        if args.command == "kv":
            from tessera.kv.cli import run_kv

            return run_kv(args)
        if args.command == "bench":
            print("tessera: error: use 'tessera bench serve ...'", file=sys.stderr)
            return 2
    except (ValueError, OSError) as e:
        # ValueError covers bad parameters, unloadable models and tokenizer problems.
        print(f"tessera: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
