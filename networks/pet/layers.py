"""Small pieces the PET methods share: a bottleneck MLP, token <-> volume views, and hook objects.

Methods insert their modules through forward hooks so the backbone keeps its own (timm) parameter
names; hooks are objects, not closures, so ``copy.deepcopy`` of a network rebinds them to the copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..context import SliceContext

__all__ = ["Bottleneck", "PatchTokenModule", "tokens_to_volume", "volume_to_tokens", "depthwise_conv3d", "OutputHook",
           "ParallelHook", "block_parts"]


class Bottleneck(nn.Module):
    """``up(act(down(x))) * scale``; with ``zero_up`` the up-projection starts at zero (identity at start)."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.ReLU, scale: float = 1.0,
                 zero_up: bool = True) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"bottleneck of {hidden} channels for a {dim}-wide block")
        self.down = nn.Linear(dim, hidden)
        self.act = act()
        self.up = nn.Linear(hidden, dim)
        self.scale = scale
        if zero_up:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x))) * self.scale


class PatchTokenModule(nn.Module):
    """An inserted module that works on the patch tokens of a block's output and leaves prefix tokens
    (class token, VPT prompts) as they are. Subclasses set ``layout``/``context`` and implement
    :meth:`transform` on the patch tokens."""

    layout: str
    context: SliceContext

    def transform(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prefix = self.context.num_prefix_tokens if self.layout == "tokens" else 0
        if not prefix:
            return self.transform(x)
        return torch.cat([x[:, :prefix], self.transform(x[:, prefix:])], dim=1)


def tokens_to_volume(z: torch.Tensor, layout: str, context: SliceContext) -> torch.Tensor:
    """Patch tokens of all slices -> ``(B, C, D, h, w)``.

    ``layout``: ``tokens`` (ViT ``(B*D, h*w, C)``, prefix tokens already removed), ``nhwc`` (Swin
    ``(B*D, h, w, C)``) or ``ndhwc`` (3D Swin ``(B, d, h, w, C)``).
    """
    if layout == "ndhwc":
        return z.permute(0, 4, 1, 2, 3)
    depth = context.depth
    if not depth or z.shape[0] % depth:
        raise ValueError(f"{z.shape[0]} slices cannot be regrouped into volumes of {depth} slices")
    if layout == "tokens":
        h, w = context.grid
        z = z.reshape(z.shape[0], h, w, z.shape[-1])
    return z.reshape(z.shape[0] // depth, depth, *z.shape[1:]).permute(0, 4, 1, 2, 3)


def volume_to_tokens(v: torch.Tensor, like: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of :func:`tokens_to_volume`, back to the shape of ``like``."""
    v = v.permute(0, 2, 3, 4, 1)
    return v if layout == "ndhwc" else v.reshape(like.shape)


def depthwise_conv3d(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """``conv(x)`` for a depth-wise ``Conv3d`` with a ``1xKxK`` (in-plane) or ``Kx1x1`` (across slices)
    kernel, run as a 2D depth-wise convolution over the same memory: the in-plane one over the ``B*D``
    slices, the other over ``(D, h*w)``. Same sums; PyTorch's depth-wise 3D kernels are 3-8x slower than
    its 2D ones in bfloat16 on a CPU (autocast) and no faster in float32 (measured, torch 2.13). Any other
    convolution (stride, dilation, another kernel or padding) runs as it is."""
    b, c, d, h, w = x.shape
    kd, kh, kw = conv.kernel_size
    plain = (conv.groups == c == conv.out_channels and conv.stride == (1, 1, 1) and conv.dilation == (1, 1, 1)
             and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple))
    if plain and kd == 1 and conv.padding[0] == 0:
        # (B, C, D, h, w) -> (B*D, C, h, w): a view when x is channels-last, as the token layouts give it
        y = x.transpose(1, 2).reshape(b * d, c, h, w)
        y = F.conv2d(y, conv.weight[:, :, 0], conv.bias, padding=conv.padding[1:], groups=c)
        return y.view(b, d, c, *y.shape[2:]).transpose(1, 2)
    if plain and kh == kw == 1 and conv.padding[1:] == (0, 0):
        y = F.conv2d(x.reshape(b, c, d, h * w), conv.weight.flatten(3), conv.bias, padding=(conv.padding[0], 0),
                     groups=c)
        return y.view(b, c, y.shape[2], h, w)
    return conv(x)


class OutputHook:
    """Forward hook: the module's output becomes ``fn(output)``."""

    def __init__(self, fn: nn.Module) -> None:
        self.fn = fn

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.fn(output)


class ParallelHook:
    """Forward hook: the module's output becomes ``output + fn(input)`` (a branch beside the module)."""

    def __init__(self, fn: nn.Module) -> None:
        self.fn = fn

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.fn(args[0])


def block_parts(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The attention and MLP sub-layers of a Transformer block (timm and MONAI both call them attn, mlp)."""
    try:
        return block.attn, block.mlp
    except AttributeError:
        raise ValueError(f"{type(block).__name__} has no attn/mlp sub-layers this method can attach to") from None
