"""How far GLM-5-FP8 moves the logits, and how that compares with plain weight noise.

    python bench/fp8_accuracy.py [--model DIR] [--lengths 40 300]

Quantizes the checkpoint with tools/quantize_fp8.py (128x128 weight blocks), then compares, in
float32 and against the source model: FP8 weights + per-token activation groups (what an FP8
GEMM computes), FP8 weights only, and the source model with Gaussian weight noise as large as
each tensor's own FP8 round-trip error (mean over 3 seeds). Reports relative logit error
(||a - b|| / ||b||), the lowest per-token cosine similarity and greedy top-1 agreement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from glm5c.batch import SeqChunk, build_step_batch
from glm5c.kv_cache import KVCache
from glm5c.ops import REFERENCE, fp8, linear_ref
from glm5c.tools.quantize_fp8 import quantize_checkpoint
from glm5c.weights import build_model


def logits_of(model, seqs: list[list[int]]) -> torch.Tensor:
    """Every position's logits, each sequence prefilled in one step."""
    outs = []
    for ids in seqs:
        blocks = -(-len(ids) // 16)
        cache = KVCache(model.config, blocks, 16, model.dtype)
        batch = build_step_batch([SeqChunk(ids, 0, list(range(blocks)), all_logits=True)], 16, cache.pad_slot)
        with torch.inference_mode():
            outs.append(model.logits(model(batch, cache)[batch.logits_indices]))
    return torch.cat(outs)


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {
        "rel_err": ((out - ref).norm() / ref.norm()).item(),
        "min_cos": F.cosine_similarity(out, ref, dim=-1).min().item(),
        "top1_agree": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="BF16 checkpoint dir (default: the built-in mini model)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[40, 300])
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.model is None:
        from glm5c.default_model import default_model_dir

        args.model = str(default_model_dir())
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(22, 1300, (n,), generator=g).tolist() for n in args.lengths]
    base = build_model(args.model, dtype=torch.float32)
    ref = logits_of(base, seqs)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        q_dir = Path(tmp) / "fp8"
        quantize_checkpoint(args.model, q_dir)

        def weight_only(x, w, scale_inv=None):
            return linear_ref(x, w) if scale_inv is None else fp8.fp8_linear(x, w, scale_inv, quantize_activations=False)

        rows["fp8 weights + activations"] = compare(logits_of(build_model(q_dir, dtype=torch.float32), seqs), ref)
        wo = build_model(q_dir, dtype=torch.float32, ops=dataclasses.replace(REFERENCE, linear=weight_only))
        rows["fp8 weights only"] = compare(logits_of(wo, seqs), ref)
        deq = dict(build_model(q_dir, dtype=torch.float32, keep_fp8=False).named_parameters())
    noise = []
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        noisy = build_model(args.model, dtype=torch.float32)
        with torch.no_grad():
            for name, p in noisy.named_parameters():
                rms_rel = ((deq[name] - p).norm() / p.norm()).item() if p.norm() > 0 else 0.0
                p.mul_(1 + rms_rel * torch.randn(p.shape, generator=gen))
        noise.append(compare(logits_of(noisy, seqs), ref))
    rows["gaussian noise of the same size"] = {k: sum(n[k] for n in noise) / len(noise) for k in noise[0]}
    for name, r in rows.items():
        print(f"{name:34s} rel_err {r['rel_err']:.3f}  min_cos {r['min_cos']:.3f}  top1 {r['top1_agree']:.3f}")
    print(json.dumps({"model": args.model, "lengths": args.lengths, "rows": rows}))


if __name__ == "__main__":
    main()
