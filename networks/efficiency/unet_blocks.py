"""MONAI's residual U-Net blocks, keeping fewer activations for the backward pass; same parameters, same math.

SwinUNETR's convolutional half (``encoder1..4``, ``encoder10``, ``decoder1..5``) is built from MONAI's
``UnetResBlock``: ``conv -> InstanceNorm -> LeakyReLU -> conv -> InstanceNorm``, plus a shortcut (the
input, or a 1x1x1 conv and InstanceNorm), added, then LeakyReLU. Run as separate modules, autograd keeps
every convolution's output for its InstanceNorm's backward pass, and each ``UnetrUpBlock`` keeps the
concatenation of its upsampled map and its skip as a tensor of its own. At a 96^3 patch the two
full-resolution blocks (``encoder1``, ``decoder1``; 48-96 channels) hold 1.9 GiB this way, 40 % of all
the network keeps, and every method pays it alike, whatever it freezes.

A non-affine InstanceNorm followed by a LeakyReLU needs neither tensor it read: the activation's output
gives back the normalised map (LeakyReLU with a positive slope is invertible) and the normalised map
with the per-channel 1/std is all InstanceNorm's gradient needs. So here

* ``conv -> norm -> act`` keeps only its output, which the next convolution keeps anyway;
* ``act(norm(a) + shortcut)`` keeps its output and the normalised ``a``; a normalised shortcut is
  recovered as their difference;
* an up-block hands its two maps to the first convolutions as two parts (the weight's input channels
  split to match) instead of concatenating them; the skip is already kept by the block that made it.

A 96^3 SwinUNETR then keeps ~0.8 GiB less, in full fine-tuning as in Med-Tuning; gradients equal MONAI's
to rounding (float64 tests). Blocks with another norm, an affine norm, dropout or another activation
keep MONAI's own forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetResBlock
from monai.networks.blocks.unetr_block import UnetrUpBlock
from torch import nn
from torch.autograd.function import once_differentiable

from .autograd import apply_function

__all__ = ["MemoryEfficientUnetResBlock", "MemoryEfficientUnetrUpBlock", "use_memory_efficient_blocks",
           "instance_norm_leaky_relu", "residual_instance_norm_leaky_relu"]

INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _channel_rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, *spatial] -> [1, B*C, L]``: instance norm is batch norm over one row per (sample, channel)."""
    return x.reshape(1, x.shape[0] * x.shape[1], -1)


def _normalise(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-affine instance norm (the kernel ``F.instance_norm`` calls) and the per-row 1/std it used."""
    y, _, rstd = torch.native_batch_norm(_channel_rows(x), None, None, None, None, True, 0.0, eps)
    return y.view(x.shape), rstd


def _normalise_backward(grad_y: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor, eps: float) -> torch.Tensor:
    """Instance norm's input gradient from its *output* ``y``: batch norm's backward kernel read with mean 0
    and 1/std 1 (so its "normalised input" is ``y`` itself), then scaled by the true 1/std."""
    rows = rstd.shape[0]
    grad, _, _ = torch.ops.aten.native_batch_norm_backward(
        _channel_rows(grad_y), _channel_rows(y), None, None, None, rstd.new_zeros(rows), rstd.new_ones(rows),
        True, eps, [True, False, False])
    return grad.mul_(rstd.view(1, rows, 1)).view(y.shape)


def _leaky_relu_inverse(out: torch.Tensor, slope: float) -> torch.Tensor:
    return F.leaky_relu(out, 1.0 / slope)


class _InstanceNormLeakyReLU(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, eps: float, slope: float):
        y, rstd = _normalise(x, eps)
        out = F.leaky_relu_(y, slope)
        ctx.eps, ctx.slope = eps, slope
        ctx.save_for_backward(out, rstd)
        return out

    @staticmethod
    @once_differentiable  # the backward formulas read outputs, not inputs: no second derivatives
    def backward(ctx, grad_out):
        out, rstd = ctx.saved_tensors
        grad_y = torch.ops.aten.leaky_relu_backward(grad_out, out, ctx.slope, True)
        return _normalise_backward(grad_y, _leaky_relu_inverse(out, ctx.slope), rstd, ctx.eps), None, None


class _ResidualInstanceNormLeakyReLU(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, shortcut, normalise_shortcut: bool, eps: float, slope: float):
        y, rstd = _normalise(x, eps)
        shortcut_rstd = None
        if normalise_shortcut:
            shortcut, shortcut_rstd = _normalise(shortcut, eps)
        out = F.leaky_relu_(y + shortcut, slope)
        ctx.eps, ctx.slope, ctx.normalise_shortcut = eps, slope, normalise_shortcut
        ctx.save_for_backward(out, y, rstd, shortcut_rstd)
        return out

    @staticmethod
    @once_differentiable  # the backward formulas read outputs, not inputs: no second derivatives
    def backward(ctx, grad_out):
        out, y, rstd, shortcut_rstd = ctx.saved_tensors
        grad_sum = torch.ops.aten.leaky_relu_backward(grad_out, out, ctx.slope, True)
        grad_x = _normalise_backward(grad_sum, y, rstd, ctx.eps)
        if not ctx.normalise_shortcut:
            return grad_x, grad_sum, None, None, None
        normalised_shortcut = _leaky_relu_inverse(out, ctx.slope).sub_(y)
        return grad_x, _normalise_backward(grad_sum, normalised_shortcut, shortcut_rstd, ctx.eps), None, None, None


def instance_norm_leaky_relu(x: torch.Tensor, eps: float = 1e-5, slope: float = 0.01) -> torch.Tensor:
    """``leaky_relu(instance_norm(x))`` (non-affine), keeping only its output for the backward pass."""
    return apply_function(_InstanceNormLeakyReLU, x, eps, slope)


def residual_instance_norm_leaky_relu(x: torch.Tensor, shortcut: torch.Tensor, normalise_shortcut: bool,
                                      eps: float = 1e-5, slope: float = 0.01) -> torch.Tensor:
    """``leaky_relu(instance_norm(x) + s)`` with ``s = instance_norm(shortcut)`` or ``shortcut`` itself,
    keeping its output and ``instance_norm(x)`` for the backward pass."""
    return apply_function(_ResidualInstanceNormLeakyReLU, x, shortcut, normalise_shortcut, eps, slope)


def _conv_over_parts(conv: nn.Module, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``conv(torch.cat(parts, 1))`` without the concatenation: one convolution per part with its slice of
    the weight's input channels, summed (each part is kept once, by its own convolution)."""
    if len(parts) == 1:
        return conv(parts[0])
    channels = sum(part.shape[1] for part in parts)
    if channels != conv.in_channels:
        raise ValueError(f"parts have {channels} channels, the convolution takes {conv.in_channels}")
    out, start = None, 0
    for i, part in enumerate(parts):
        weight = conv.weight[:, start:start + part.shape[1]]
        term = conv._conv_forward(part, weight, conv.bias if i == 0 else None)
        out = term if out is None else out.add_(term)
        start += part.shape[1]
    return out


class MemoryEfficientUnetResBlock(UnetResBlock):
    """``UnetResBlock`` keeping only the tensors listed in the module docstring; made by
    :func:`use_memory_efficient_blocks` from a supported block (same parameters and state dict)."""

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.forward_parts((inp,))

    def forward_parts(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The block on ``torch.cat(parts, 1)``, without forming the concatenation."""
        eps, slope = self.norm1.eps, self.lrelu.negative_slope
        hidden = instance_norm_leaky_relu(_conv_over_parts(self.conv1.conv, parts), eps, slope)
        hidden = self.conv2(hidden)
        if self.downsample:
            return residual_instance_norm_leaky_relu(hidden, _conv_over_parts(self.conv3.conv, parts), True,
                                                     eps, slope)
        (inp,) = parts
        return residual_instance_norm_leaky_relu(hidden, inp, False, eps, slope)


class MemoryEfficientUnetrUpBlock(UnetrUpBlock):
    """``UnetrUpBlock`` handing its upsampled map and its skip to the residual block as two parts."""

    def forward(self, inp: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block.forward_parts((self.transp_conv(inp), skip))


def _plain_conv(conv: nn.Module) -> bool:
    """A MONAI ``Convolution`` with no norm, activation or dropout after its ``conv``."""
    return len(conv) == 1 and hasattr(conv, "conv")


def _supported(block: UnetResBlock) -> bool:
    norms = [block.norm1, block.norm2] + ([block.norm3] if block.downsample else [])
    convs = [block.conv1, block.conv2] + ([block.conv3] if block.downsample else [])
    return (all(isinstance(n, INSTANCE_NORMS) and not n.affine and not n.track_running_stats for n in norms)
            and len({n.eps for n in norms}) == 1
            and isinstance(block.lrelu, nn.LeakyReLU) and block.lrelu.negative_slope > 0
            and all(map(_plain_conv, convs)))


def use_memory_efficient_blocks(module: nn.Module) -> int:
    """Turn every supported ``UnetResBlock`` (and the ``UnetrUpBlock`` around one) in ``module`` into its
    memory-efficient form, in place; parameters, buffers and their names are untouched. Returns how many
    residual blocks were converted."""
    converted = 0
    for block in module.modules():
        if type(block) is UnetResBlock and _supported(block):
            block.__class__ = MemoryEfficientUnetResBlock  # adds no state: a forward of its own only
            converted += 1
    for block in module.modules():
        if type(block) is UnetrUpBlock and isinstance(block.conv_block, MemoryEfficientUnetResBlock):
            block.__class__ = MemoryEfficientUnetrUpBlock
    return converted
