"""The `glm5c` command.

    glm5c compile  [--model DIR] --out ARTIFACTS [--buckets 1,2,4,8] [--device cpu|cuda] [--max-model-len N] [--no-mtp]
    glm5c generate [--model DIR] [--artifacts ARTIFACTS] [--prompt TEXT ...] [--chat] [--max-tokens N]
    glm5c serve    [--model DIR] [--artifacts ARTIFACTS] [--host 127.0.0.1] [--port 5555] [--curve-keys DIR]
    glm5c keys     --out DIR
    glm5c bench    latency [--batch-size 8 --input-len 32 --output-len 128 --baseline transformers ...]
    glm5c bench    serve [--launch | --address ADDR] [--num-prompts 100 --concurrency-sweep 1,4,16 ...]

Without --model, commands use the built-in default model (made on first use).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm5c", description="A compiled-graph inference engine for GLM-5.")
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="compile the model ahead of time, one graph per token bucket")
    comp.add_argument("--model", help="Hugging Face model directory (default: the built-in mini model)")
    comp.add_argument("--out", required=True, help="artifact directory to write (replaced if it holds artifacts)")
    comp.add_argument("--buckets", help="comma-separated token counts (default: 1,2,4,...,256 on cpu; "
                      "1,2,4,8,16,...,256,512,1024,2048 on cuda)")  # fmt: skip
    comp.add_argument("--device", default="cpu", help="cpu or cuda[:N] (the machine the artifacts will run on)")
    comp.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: the checkpoint's")
    comp.add_argument("--block-size", type=_positive_int, default=16, help="KV cache block size in tokens")
    comp.add_argument("--max-model-len", type=_positive_int, help="longest sequence (default: min(context, 8192))")
    comp.add_argument("--fp8-index-cache", action="store_true", help="keep the DSA indexer keys in FP8 (GPUs sm_89+)")
    comp.add_argument("--no-mtp", action="store_true",
                      help="leave out the MTP layer's graphs (shorter compile; speculative decoding then refuses them)")

    gen = sub.add_parser("generate", help="generate text for one or more prompts, in-process")
    gen.add_argument("--model", help="Hugging Face model directory (default: the built-in mini model)")
    gen.add_argument("--artifacts", help="run the compiled graphs from this `glm5c compile` directory")
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the chat template")
    gen.add_argument("--no-think", action="store_true", help="with --chat: thinking off (enable_thinking=False)")
    gen.add_argument("--max-tokens", type=_positive_int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    gen.add_argument("--speculative-tokens", type=int, default=0, help="MTP draft tokens per step (0: off)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")

    srv = sub.add_parser("serve", help="serve over ZMQ + msgspec (see glm5c/protocol.py) until SIGTERM")
    srv.add_argument("--model", help="Hugging Face model directory (default: the built-in mini model)")
    srv.add_argument("--artifacts", help="serve the compiled graphs from this `glm5c compile` directory")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (beyond loopback needs --curve-keys)")
    srv.add_argument("--port", type=int, default=5555, help="TCP port (0: any free port, printed when ready)")
    srv.add_argument("--curve-keys", help="directory from `glm5c keys`: encrypt, and admit only its clients")
    srv.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    srv.add_argument("--device", default="cpu")
    srv.add_argument("--num-blocks", type=_positive_int, help="KV cache blocks (default: sized from memory)")
    srv.add_argument("--max-seqs", type=_positive_int, default=256, help="sequences per step")
    srv.add_argument("--max-tokens-per-step", type=_positive_int, default=256)
    srv.add_argument("--max-waiting", type=_positive_int, default=4096, help="queued requests before queue_full")
    srv.add_argument("--no-prefix-caching", action="store_true")
    srv.add_argument("--speculative-tokens", type=int, default=0, help="MTP draft tokens per step (0: off)")
    srv.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for requests in flight")
    srv.add_argument("--max-restarts", type=int, default=3, help="child deaths survived before exiting with 1")

    from .bench import latency as bench_latency
    from .bench import serve as bench_serve

    bench = sub.add_parser("bench", help="latency and serving benchmarks (vLLM's flags and metric names)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bench_latency.add_arguments(bench_sub.add_parser("latency", help=bench_latency.__doc__.split("\n")[0],
                                                     description=bench_latency.__doc__))  # fmt: skip
    bench_serve.add_arguments(bench_sub.add_parser("serve", help=bench_serve.__doc__.split("\n")[0],
                                                   description=bench_serve.__doc__))  # fmt: skip

    keys = sub.add_parser("keys", help="make CURVE key pairs for serve --curve-keys and the client")
    keys.add_argument("--out", required=True, help="directory to write server.key(_secret), client.key(_secret)")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from .default_model import default_model_dir
    from .engine import EngineConfig
    from .serve import ServeConfig, serve

    engine = EngineConfig(
        num_blocks=args.num_blocks, max_tokens_per_step=args.max_tokens_per_step, max_seqs=args.max_seqs,
        max_waiting=args.max_waiting, prefix_caching=not args.no_prefix_caching,
        num_speculative_tokens=args.speculative_tokens,
    )  # fmt: skip
    config = ServeConfig(
        str(args.model or default_model_dir()), args.artifacts, args.host, args.port, args.curve_keys, args.dtype,
        args.device, engine, args.drain_timeout, args.max_restarts,
    )  # fmt: skip
    return serve(config)


def _keys(args: argparse.Namespace) -> None:
    from pathlib import Path

    import zmq.auth

    out = Path(args.out)
    existing = [f.name for f in out.glob("*.key*")] if out.is_dir() else []
    if existing:
        raise ValueError(f"{out} already holds keys ({', '.join(sorted(existing))}); choose an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("server", "client"):
        zmq.auth.create_certificates(out, name)
    for secret in out.glob("*.key_secret"):
        secret.chmod(0o600)
    print(f"wrote {out}/server.key(_secret) and {out}/client.key(_secret): serve with --curve-keys {out}; "
          f"give clients server.key and their own key pair (the server admits every *.key in {out})")  # fmt: skip


def _generate(args: argparse.Namespace) -> None:
    from . import LLM, SamplingParams

    prompts = args.prompt or ["The quick brown fox"]
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, ignore_eos=args.ignore_eos
    )
    t0 = time.perf_counter()
    from .engine import EngineConfig

    llm = LLM(args.model, dtype=args.dtype, artifacts=args.artifacts,
              engine_config=EngineConfig(num_speculative_tokens=args.speculative_tokens))  # fmt: skip
    load_s = time.perf_counter() - t0
    if args.chat:
        if llm.tokenizer is None:
            raise ValueError(f"--chat needs a tokenizer, and {llm.model_dir} has none")
        prompts = [
            llm.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                enable_thinking=not args.no_think,
            )
            for p in prompts
        ]  # fmt: skip
    outputs = llm.generate(prompts, params)
    stats = llm.last_stats
    for prompt, out in zip(prompts, outputs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason}))  # fmt: skip
        else:
            print(f"{prompt!r} -> {out.text!r} [{len(out.token_ids)} tokens, {out.finish_reason}]")
    rate = stats["generated"] / stats["elapsed_s"] if stats["elapsed_s"] else 0.0
    print(
        f"model {llm.model_dir} loaded in {load_s:.2f} s; {stats['generated']} tokens in {stats['steps']} steps, "
        f"{stats['elapsed_s']:.2f} s ({rate:.1f} tok/s, {'compiled graphs' if llm.runner else 'eager reference ops'})"
        + (f"; MTP accept length {llm.engine.drafter.stats.mean_accept_length:.2f}" if llm.engine.drafter else ""),
        file=sys.stderr,
    )


def _compile(args: argparse.Namespace) -> None:
    from .default_model import default_model_dir
    from .graphs.buckets import Buckets
    from .graphs.compile import compile_artifacts

    model = args.model or str(default_model_dir())
    buckets = Buckets.parse(args.buckets) if args.buckets else Buckets.default(args.device)
    print(f"compiling {model} for {args.device}: {len(buckets.sizes)} buckets {list(buckets.sizes)}", flush=True)
    manifest = compile_artifacts(
        model, args.out, buckets, device=args.device, dtype=args.dtype, block_size=args.block_size,
        max_model_len=args.max_model_len, fp8_index_cache=args.fp8_index_cache, mtp=not args.no_mtp,
        progress=lambda line: print(line, flush=True),
    )  # fmt: skip
    mtp = f" + {len(manifest.mtp_buckets)} MTP-layer graphs" if manifest.mtp_buckets else ""
    print(f"wrote {args.out}: {len(manifest.buckets)} graphs{mtp} in {manifest.compile_s:.1f} s "
          f"(max_model_len {manifest.max_model_len}, block size {manifest.block_size})")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "compile":
            _compile(args)
        elif args.command == "generate":
            _generate(args)
        elif args.command == "serve":
            return _serve(args)
        elif args.command == "keys":
            _keys(args)
        elif args.command == "bench":
            from .bench import latency, serve

            (latency if args.bench_command == "latency" else serve).main(args)
    except (ValueError, OSError) as e:  # bad input: config, checkpoint, prompt or parameters
        print(f"glm5c: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
