"""Swin-Unet's full-resolution head in row chunks: x4 expansion, LayerNorm and 1x1 classifier in one pass.

The head turns each token of the last decoder stage into ``s*s`` pixels of ``C`` channels (a bias-free
Linear ``C -> s*s*C``), normalises each pixel and classifies it (``K`` channels). Written as three
modules it materialises the full-resolution ``C``-channel map several times over (expansion, normalised
map, their gradients): at 128x128 slices that is the largest tensor of the whole network, ``s*s`` times
the last stage's, and autograd keeps two copies of it per step. It is also slow on a CPU, where every
such buffer is fresh memory and each pass over it streams from RAM.

:func:`expand_norm_classify` computes the same thing a few hundred tokens at a time, so the expanded
rows never leave the cache, and keeps only its input and the weights for the backward pass, which
recomputes the expansion and its LayerNorm chunk by chunk (one small matrix product). Every tuned
method shares the decoder, so every method gains alike.
"""

from __future__ import annotations

import torch

from .autograd import apply_function

__all__ = ["expand_norm_classify", "CHUNK_ELEMENTS"]

# expanded elements per chunk: ~2 MiB of float32 on a CPU (near the cache; 2^17..2^21 measured alike),
# more on a GPU (fewer launches)
CHUNK_ELEMENTS = {"cpu": 1 << 19}
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def _rows_per_chunk(device: torch.device, expanded_width: int) -> int:
    return max(1, CHUNK_ELEMENTS.get(device.type, DEFAULT_CHUNK_ELEMENTS) // expanded_width)


def _statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # LayerNorm never in reduced precision


def _expand_and_norm(x: torch.Tensor, expand_weight: torch.Tensor, norm_weight: torch.Tensor,
                     norm_bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """One chunk: expansion ``z`` (rows*P, C) and its LayerNorm ``v`` with the per-pixel mean and 1/std."""
    channels = norm_weight.shape[0]
    z = (x @ expand_weight.t()).view(-1, channels).to(norm_weight.dtype)
    v, mean, rstd = torch.native_layer_norm(z, (channels,), norm_weight, norm_bias, eps)
    return z, v, mean, rstd


class _ExpandNormClassify(torch.autograd.Function):
    """``x (N, C) -> logits (N*P, K)`` with ``P = s*s`` pixels per token; see :func:`expand_norm_classify`.
    The LayerNorm parameters and the classifier arrive in the statistics dtype (float32 or wider)."""

    @staticmethod
    def forward(ctx, x, expand_weight, norm_weight, norm_bias, classifier_weight, eps: float):
        pixels = expand_weight.shape[0] // norm_weight.shape[0]
        rows = _rows_per_chunk(x.device, expand_weight.shape[0])
        logits = x.new_empty((x.shape[0] * pixels, classifier_weight.shape[0]), dtype=norm_weight.dtype)
        for start in range(0, x.shape[0], rows):
            _, v, _, _ = _expand_and_norm(x[start:start + rows], expand_weight, norm_weight, norm_bias, eps)
            torch.mm(v, classifier_weight.t(), out=logits[start * pixels:(start + rows) * pixels])
        ctx.eps = eps
        ctx.save_for_backward(x, expand_weight, norm_weight, norm_bias, classifier_weight)
        return logits

    @staticmethod
    def backward(ctx, grad_logits):
        x, expand_weight, norm_weight, norm_bias, classifier_weight = ctx.saved_tensors
        channels = norm_weight.shape[0]
        pixels = expand_weight.shape[0] // channels
        rows = _rows_per_chunk(x.device, expand_weight.shape[0])
        grad_logits = grad_logits.to(norm_weight.dtype)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_expand = torch.zeros(expand_weight.shape, dtype=norm_weight.dtype, device=x.device)
        grad_gamma, grad_beta = torch.zeros_like(norm_weight), torch.zeros_like(norm_bias)
        grad_classifier = torch.zeros_like(classifier_weight)
        for start in range(0, x.shape[0], rows):
            x_rows = x[start:start + rows]
            g = grad_logits[start * pixels:(start + rows) * pixels]
            # the expansion is recomputed (one small product) rather than kept for the whole image
            z, v, mean, rstd = _expand_and_norm(x_rows, expand_weight, norm_weight, norm_bias, eps=ctx.eps)
            grad_classifier += g.t() @ v
            grad_z, grad_g, grad_b = torch.ops.aten.native_layer_norm_backward(
                g @ classifier_weight, z, (channels,), mean, rstd, norm_weight, norm_bias, [True, True, True])
            grad_gamma += grad_g
            grad_beta += grad_b
            grad_z = grad_z.view(-1, pixels * channels).to(x.dtype)
            grad_expand += grad_z.t() @ x_rows
            if grad_x is not None:
                torch.mm(grad_z, expand_weight, out=grad_x[start:start + rows])
        return grad_x, grad_expand.to(expand_weight.dtype), grad_gamma, grad_beta, grad_classifier, None


def expand_norm_classify(x: torch.Tensor, expand_weight: torch.Tensor, norm_weight: torch.Tensor,
                         norm_bias: torch.Tensor, classifier_weight: torch.Tensor, scale: int,
                         eps: float = 1e-5) -> torch.Tensor:
    """``classifier(LayerNorm(pixel_shuffle(x @ expand_weight.T)))`` for NHWC ``x``, chunked.

    ``x``: ``(B, h, w, C)``; ``expand_weight``: ``(s*s*C, C)`` (bias-free); ``norm_*``: ``(C,)``;
    ``classifier_weight``: ``(K, C)`` (a bias-free 1x1 convolution, flattened). Returns logits
    ``(B, K, s*h, s*w)``. Under autocast the expansion runs in the autocast dtype, the normalisation and
    the classifier in float32, as autocast itself would place them.
    """
    b, h, w, c = x.shape
    if expand_weight.shape != (scale * scale * c, c):
        raise ValueError(f"expansion weight {tuple(expand_weight.shape)} does not expand {c} channels x{scale}")
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    stats = _statistics_dtype(dtype)
    with torch.autocast(x.device.type, enabled=False):
        logits = apply_function(_ExpandNormClassify, x.reshape(-1, c).to(dtype), expand_weight.to(dtype),
                                norm_weight.to(stats), norm_bias.to(stats), classifier_weight.flatten(1).to(stats), eps)
    logits = logits.view(b, h, w, scale, scale, -1)
    return logits.permute(0, 5, 1, 3, 2, 4).reshape(b, -1, h * scale, w * scale)
