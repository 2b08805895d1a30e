"""The `glm5c` command.

    glm5c generate [--model DIR] [--prompt TEXT ...] [--chat] [--max-tokens N] [--temperature T]

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
    gen = sub.add_parser("generate", help="generate text for one or more prompts, in-process")
    gen.add_argument("--model", help="Hugging Face model directory (default: the built-in mini model)")
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the chat template")
    gen.add_argument("--no-think", action="store_true", help="with --chat: thinking off (enable_thinking=False)")
    gen.add_argument("--max-tokens", type=_positive_int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return parser


def _generate(args: argparse.Namespace) -> None:
    from . import LLM, SamplingParams

    prompts = args.prompt or ["The quick brown fox"]
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, ignore_eos=args.ignore_eos
    )
    t0 = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype)
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
        f"{stats['elapsed_s']:.2f} s ({rate:.1f} tok/s, eager reference ops)",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            _generate(args)
    except (ValueError, OSError) as e:  # bad input: config, checkpoint, prompt or parameters
        print(f"glm5c: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
