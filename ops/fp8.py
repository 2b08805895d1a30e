"""FP8 block quantization (plain-torch reference), as used by GLM-5-FP8 and DeepSeek-V3.

Format
------
Weights: a linear weight ``w [N, K]`` is stored as ``w_fp8 [N, K]`` in float8_e4m3fn plus
``scale_inv [ceil(N/128), ceil(K/128)]`` in fp32, one scale per 128x128 block (edge blocks may be
ragged). The real weight is ``w[i, j] = float32(w_fp8[i, j]) * scale_inv[i // 128, j // 128]``.
When quantizing, each block's scale is ``amax(|block|) / 448`` (448 is the largest e4m3fn value),
so the block's largest element maps to +-448.

Activations ("activation_scheme": "dynamic"): quantized at run time per token, in groups of 128
along the hidden dim: ``x [..., K] -> x_fp8 [..., K]`` and ``scale [..., ceil(K/128)]`` (fp32),
``x ~= float32(x_fp8) * scale``.

e4m3fn has 4 exponent bits and 3 mantissa bits, no infinities, max 448, smallest normal 2^-6,
smallest subnormal 2^-9. Round to nearest gives a relative error <= 2^-4 for normal values and an
absolute error <= 2^-10 for subnormal ones (in units of the scaled value).

On CPU torch can convert to and from float8_e4m3fn but has no fp8 arithmetic, so every function
here converts to float32 before doing math.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
WEIGHT_BLOCK = 128
ACT_GROUP = 128

# Floor for scales so that an all-zero block or group never divides by zero.
_SCALE_FLOOR = torch.finfo(torch.float32).tiny


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _to_fp8(x: Tensor) -> Tensor:
    """fp32 values already divided by their scale -> float8_e4m3fn (saturating, RNE)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_weight_blocks(w: Tensor, block: int = WEIGHT_BLOCK) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (w_fp8 [N, K] float8_e4m3fn, scale_inv [ceil(N/block), ceil(K/block)] fp32)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight_blocks expects a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    nb, kb = _ceil_div(n, block), _ceil_div(k, block)
    # Zero-pad to whole blocks: zeros change no amax.
    wp = F.pad(w.float(), (0, kb * block - k, 0, nb * block - n))  # [nb*block, kb*block]
    blocks = wp.view(nb, block, kb, block)  # [nb, block, kb, block]
    amax = blocks.abs().amax(dim=(1, 3))  # [nb, kb]
    scale_inv = (amax / FP8_MAX).clamp_min(_SCALE_FLOOR)  # [nb, kb]
    q = _to_fp8(blocks / scale_inv[:, None, :, None])  # [nb, block, kb, block]
    w_fp8 = q.view(nb * block, kb * block)[:n, :k].contiguous()  # [N, K]
    return w_fp8, scale_inv


def dequantize_weight_blocks(
    w_fp8: Tensor, scale_inv: Tensor, dtype: torch.dtype, block: int = WEIGHT_BLOCK
) -> Tensor:
    """(w_fp8 [N, K], scale_inv [ceil(N/block), ceil(K/block)]) -> w [N, K] in `dtype`.

    Computes float32(w_fp8[i, j]) * scale_inv[i // block, j // block] in fp32, then casts.
    """
    if w_fp8.dim() != 2:
        raise ValueError(f"w_fp8 must be 2-D, got shape {tuple(w_fp8.shape)}")
    if w_fp8.dtype != FP8_DTYPE:
        raise ValueError(f"w_fp8 must be {FP8_DTYPE}, got {w_fp8.dtype}")
    n, k = w_fp8.shape
    want = (_ceil_div(n, block), _ceil_div(k, block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match weight shape {(n, k)} "
            f"with block {block}: expected {want}"
        )
    s = scale_inv.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]  # [N, K]
    return (w_fp8.float() * s).to(dtype)


def quantize_act_groups(x: Tensor, group: int = ACT_GROUP) -> tuple[Tensor, Tensor]:
    """x [..., K] -> (x_fp8 [..., K] float8_e4m3fn, scale [..., ceil(K/group)] fp32)."""
    k = x.shape[-1]
    g = _ceil_div(k, group)
    xp = F.pad(x.float(), (0, g * group - k))  # [..., g*group]
    groups = xp.view(*x.shape[:-1], g, group)  # [..., g, group]
    scale = (groups.abs().amax(dim=-1) / FP8_MAX).clamp_min(_SCALE_FLOOR)  # [..., g]
    q = _to_fp8(groups / scale[..., None])  # [..., g, group]
    x_fp8 = q.view(*x.shape[:-1], g * group)[..., :k].contiguous()  # [..., K]
    return x_fp8, scale


def dequantize_act_groups(
    x_fp8: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32, group: int = ACT_GROUP
) -> Tensor:
    """(x_fp8 [..., K], scale [..., ceil(K/group)]) -> x [..., K] in `dtype` (math in fp32)."""
    k = x_fp8.shape[-1]
    want = (*x_fp8.shape[:-1], _ceil_div(k, group))
    if tuple(scale.shape) != want:
        raise ValueError(
            f"scale shape {tuple(scale.shape)} does not match activation shape "
            f"{tuple(x_fp8.shape)} with group {group}: expected {want}"
        )
    s = scale.float().repeat_interleave(group, dim=-1)[..., :k]  # [..., K]
    return (x_fp8.float() * s).to(dtype)


def fp8_linear(
    x: Tensor, w_fp8: Tensor, scale_inv: Tensor, quantize_activations: bool = True
) -> Tensor:
    """Reference block-scaled FP8 GEMM: x [..., K] @ dequant(w_fp8 [N, K]).T -> y [..., N].

    With `quantize_activations`, x goes through per-token, 128-group fp8 quantization first
    (what an FP8 tensor-core GEMM sees). The product is computed in fp32 and cast to x.dtype.
    """
    if w_fp8.dim() != 2 or x.shape[-1] != w_fp8.shape[1]:
        raise ValueError(
            f"fp8_linear: x shape {tuple(x.shape)} does not fit weight shape {tuple(w_fp8.shape)}"
        )
    w = dequantize_weight_blocks(w_fp8, scale_inv, torch.float32)  # [N, K]
    if quantize_activations:
        xf = dequantize_act_groups(*quantize_act_groups(x))  # [..., K] fp32
    else:
        xf = x.float()
    return (xf @ w.T).to(x.dtype)  # [..., N]
