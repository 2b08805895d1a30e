"""Eager decode speed: glm5c (reference ops, paged cache) vs transformers' generate, same
checkpoint, same machine, same run.

    python bench/bench_decode.py [--model DIR] [--dtype bfloat16] [--batch 1 4] [--new-tokens 64]

Decode tokens/s excludes prefill: each side generates N and 1 new tokens for the same prompts and
the difference in time is divided over the (N - 1) * batch decoded tokens. Best of --repeats.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def _time_it(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint dir (default: the built-in mini model)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import GlmMoeDsaForCausalLM
    from transformers.utils import logging

    from glm5c import LLM, SamplingParams
    from glm5c.default_model import default_model_dir

    model_dir = args.model or str(default_model_dir())
    logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype)
    llm = LLM(model_dir, dtype=args.dtype)
    hf = GlmMoeDsaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    n = args.new_tokens
    rows = []
    for batch in args.batch:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(22, 1300, (batch, args.prompt_len), generator=g)

        def ours(k: int) -> None:
            llm.generate(prompts.tolist(), SamplingParams(max_tokens=k, temperature=0, ignore_eos=True))

        def theirs(k: int) -> None:
            with torch.inference_mode():
                hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=k, min_new_tokens=k,
                            do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip

        result = {"batch": batch}
        for name, fn in (("glm5c", ours), ("transformers", theirs)):
            fn(2)  # warm up
            t_n, t_1 = _time_it(lambda: fn(n), args.repeats), _time_it(lambda: fn(1), args.repeats)
            step_ms = (t_n - t_1) / (n - 1) * 1e3
            result[f"{name}_decode_step_ms"] = step_ms
            result[f"{name}_decode_tok_s"] = batch * 1e3 / step_ms
        result["speedup"] = result["glm5c_decode_tok_s"] / result["transformers_decode_tok_s"]
        rows.append(result)
        print(
            f"batch {batch:3d}: glm5c {result['glm5c_decode_tok_s']:8.1f} tok/s ({result['glm5c_decode_step_ms']:.2f} "
            f"ms/step) | transformers {result['transformers_decode_tok_s']:8.1f} tok/s "
            f"({result['transformers_decode_step_ms']:.2f} ms/step) | {result['speedup']:.2f}x",
            flush=True,
        )
    report = {
        "bench": "eager decode, reference ops",
        "model_dir": model_dir,
        "params": sum(p.numel() for p in llm.model.parameters()),
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "new_tokens": n,
        "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
