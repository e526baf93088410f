"""Med-Adapter (Med-Tuning, Wang et al.): a 3D-aware bottleneck after every Transformer block.

Per block: ``Linear C -> C' (= C / alpha)`` + GELU; the tokens of all slices are rebuilt into a
volume ``(B, C', D, h, w)``; **Intra-FE** sums two depth-wise branches (``1xKxK`` then ``Kx1x1``
convolution, BatchNorm3d, ReLU for K = 3 and 5) and an FFT global branch, then mixes channels with
a ``1x1x1`` convolution; **Inter-FI**, at the last adapter of each stage, concatenates the previous
stage's map (aligned to this grid) and fuses with a ``1x1x1`` convolution ``2C' -> C'``; the result
is added to the bottleneck features, projected back with ``Linear C' -> C`` + GELU and added to the
block's output.

The modules live in ``model.med_adapter`` and run from forward hooks on the blocks, so the
backbone keeps its own parameter names (pretrained and tuned-only checkpoints stay loadable).

The paper's ablations are options of :class:`MedAdapterConfig` (the defaults are the paper's model): which
stages get adapters (Table 4), the global branch (Table 10: FFT, or a large depth-wise convolution), each part
of Intra-FE (Table 11: the multi-scale local branches, the global branch, channel mixing) and how Inter-FI
joins the previous stage's map (Table 12: concatenation, addition, maximum, or not at all).

In training, each adapter keeps only its inputs for the backward pass and runs again there
(``recompute``, on by default): its inner activations, the C-wide GELU input and a dozen C'-wide maps,
take several times the memory of its input for a small share of the step's compute. BatchNorm running
statistics are restored after the recomputation, so they count each batch once; gradients are equal.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..context import SliceContext
from .base import AdapterSite, InsertingMethod, register_method
from .layers import OutputHook, PatchTokenModule, depthwise_conv3d, tokens_to_volume, volume_to_tokens

__all__ = ["MedAdapterConfig", "MedAdapter", "FrequencyFilter", "DepthwiseBranch", "MedAdapterMethod"]


GLOBAL_BRANCHES = ("fft", "dwconv9", "dwconv11", "none")
INTER_STAGE_MODES = ("concat", "add", "max", "off")


@dataclass
class MedAdapterConfig:
    reduction: int = 6  # alpha: bottleneck width C' = C // alpha
    # Intra-FE's multi-scale local branches (MLB), one per kernel size; () leaves them out
    kernel_sizes: tuple[int, ...] = (3, 5)
    # Intra-FE's global branch: the FFT filter (FGB), a large depth-wise convolution in its place (dwconv9, dwconv11:
    # 1xKxK then Kx1x1, as the local branches but with a K-wide field), or none
    global_branch: str = "fft"
    channel_mixing: bool = True  # Intra-FE's 1x1x1 convolution after the branches
    # Inter-FI at the last adapter of each stage: the previous stage's map joined by concatenation and a 1x1x1
    # fusion ("concat"; True means it too), by addition ("add") or element-wise maximum ("max"), or not at all
    # ("off", or False)
    inter_stage: str = "concat"
    stages: tuple[int, ...] | None = None  # the feature stages whose blocks get adapters; None: all
    # keep only the adapter's inputs for the backward pass and run it again there: its inner
    # activations (bottleneck, depth-wise branches, FFT, up-projection) are several times its input
    recompute: bool = True

    def __post_init__(self) -> None:
        if self.inter_stage is True or self.inter_stage is False:
            self.inter_stage = "concat" if self.inter_stage else "off"
        if self.inter_stage not in INTER_STAGE_MODES:
            raise ValueError(f"inter_stage {self.inter_stage!r}: choose one of {', '.join(INTER_STAGE_MODES)}")
        if self.global_branch not in GLOBAL_BRANCHES:
            raise ValueError(f"global_branch {self.global_branch!r}: choose one of {', '.join(GLOBAL_BRANCHES)}")
        self.kernel_sizes = tuple(int(k) for k in self.kernel_sizes)
        if any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(f"kernel_sizes {self.kernel_sizes}: odd sizes of at least 1")
        if self.stages is not None:
            self.stages = tuple(sorted({int(s) for s in self.stages}))
            if not self.stages:
                raise ValueError("stages: name at least one stage, or None for all")


class FrequencyFilter(nn.Module):
    """FFT global branch: ``|ifftn(w[k_d] * fftn(x) + b[k_d])|`` over ``(D, h, w)``.

    ``w`` and ``b`` are real, one value per depth frequency, initialised to ones (reference code).
    Because they depend on the depth frequency only, the in-plane transforms cancel: the weight
    needs a 1D FFT along depth, and the bias, constant over in-plane frequencies, is an impulse at
    in-plane position (0, 0) (``tests`` check this against the direct 3D FFT). Always float32,
    also under autocast.
    """

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.weight = nn.Parameter(torch.ones(depth))
        self.bias = nn.Parameter(torch.ones(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] != self.depth:
            raise ValueError(
                f"Med-Adapter's FFT branch was built for {self.depth} slices (one weight per depth frequency) "
                f"but the volume has {x.shape[2]}; build the network with num_slices={x.shape[2]} or feed "
                f"{self.depth}-slice patches (e.g. sliding-window inference with that ROI depth)"
            )
        with torch.autocast(device_type=x.device.type, enabled=False):
            w = self.weight.float().view(1, 1, -1, 1, 1)
            y = torch.fft.ifft(torch.fft.fft(x.float(), dim=2) * w, dim=2)
            impulse = torch.fft.ifft(self.bias.float().to(torch.complex64))
            y = self._add_impulse(y, impulse)
            return y.abs()

    @staticmethod
    def _add_impulse(y: torch.Tensor, impulse: torch.Tensor) -> torch.Tensor:
        # Out of place, so autograd keeps the FFT output it needs.
        pulse = torch.zeros_like(y[:1, :1])
        pulse[0, 0, :, 0, 0] = impulse
        return y + pulse


class DepthwiseBranch(nn.Sequential):
    """``1xKxK`` then ``Kx1x1`` depth-wise convolution, BatchNorm3d, ReLU. The convolutions keep the
    reference's ``Conv3d`` parameters and run as 2D ones (:func:`~networks.pet.layers.depthwise_conv3d`)."""

    def __init__(self, channels: int, kernel: int) -> None:
        pad = kernel // 2
        super().__init__(
            nn.Conv3d(channels, channels, (1, kernel, kernel), padding=(0, pad, pad), groups=channels),
            nn.Conv3d(channels, channels, (kernel, 1, 1), padding=(pad, 0, 0), groups=channels),
            nn.BatchNorm3d(channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        in_plane, along_depth, norm, act = self
        return act(norm(depthwise_conv3d(depthwise_conv3d(v, in_plane), along_depth)))


class MedAdapter(PatchTokenModule):
    """One Med-Adapter; see the module docstring. Input and output in the site's token layout."""

    def __init__(self, site: AdapterSite, context: SliceContext, config: MedAdapterConfig,
                 reads_previous_stage: bool = True) -> None:
        super().__init__()
        hidden = site.dim // config.reduction
        if hidden < 1:
            raise ValueError(f"reduction {config.reduction} leaves no channels for a {site.dim}-wide block")
        if site.depth is None:
            raise ValueError("Med-Adapter needs the number of slices the network reads (num_slices)")
        self.layout = site.layout
        self.context = context  # shared with the network; not a submodule
        self.down_projection = nn.Linear(site.dim, hidden)
        self.branches = nn.ModuleList(DepthwiseBranch(hidden, k) for k in config.kernel_sizes)
        if config.global_branch == "fft":
            self.global_filter = FrequencyFilter(site.depth)
        elif config.global_branch.startswith("dwconv"):
            self.global_filter = DepthwiseBranch(hidden, int(config.global_branch[len("dwconv"):]))
        else:
            self.global_filter = None
        self.mix = nn.Conv3d(hidden, hidden, 1) if config.channel_mixing else nn.Identity()
        self.inter_stage_mode = config.inter_stage if site.last_in_stage else "off"
        self.inter_stage = self.inter_stage_mode != "off"
        # a stage whose previous stage has no adapters (stages=...) joins nothing, as the first stage does
        self.reads_previous_stage = reads_previous_stage
        if self.inter_stage:
            stride = tuple(site.stage_stride)
            if stride == (1, 1, 1):  # same grid (ViT): 1x1x1 alignment
                self.align = nn.Conv3d(hidden, hidden, 1)
            else:  # previous stage is finer and C'/2 wide: strided 3x3 (in the strided axes) conv
                kernel = tuple(3 if s > 1 else 1 for s in stride)
                self.align = nn.Conv3d(hidden // 2, hidden, kernel, stride=stride, padding=tuple(k // 2 for k in kernel))
            if self.inter_stage_mode == "concat":
                self.fuse = nn.Conv3d(2 * hidden, hidden, 1)
        self.up_projection = nn.Linear(hidden, site.dim)
        self.act = nn.GELU()
        self.recompute = config.recompute

    def inter_stage_map(self, local: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        if prev is None:
            # First stage: the reference aligns an all-zero map, which leaves the conv's bias. The
            # weight stays in the graph with its (zero) gradient so DDP sees every parameter used.
            bias = self.align.bias + 0.0 * self.align.weight.sum()
            aligned = bias.view(1, -1, 1, 1, 1).expand_as(local)
        else:
            aligned = self.align(prev)
            if aligned.shape[2:] != local.shape[2:]:
                raise ValueError(f"inter-stage map {tuple(aligned.shape[2:])} does not align with {tuple(local.shape[2:])}")
        aligned = aligned.to(local.dtype)
        if self.inter_stage_mode == "add":
            return local + aligned
        if self.inter_stage_mode == "max":
            return torch.maximum(local, aligned)
        return self.fuse(torch.cat([local, aligned], dim=1))

    def adapt(self, tokens: torch.Tensor, prev: torch.Tensor | None,
              geometry: SliceContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The adapter as a function of its inputs alone (what a recomputation needs): the block's patch
        tokens, the previous stage's map and the slice geometry. Returns the new tokens and this stage's
        map (``None`` unless this adapter closes a stage)."""
        z = self.act(self.down_projection(tokens))
        v = tokens_to_volume(z, self.layout, geometry)
        parts = [branch(v) for branch in self.branches]
        if self.global_filter is not None:
            parts.append(self.global_filter(v))
        local = sum(parts) if parts else torch.zeros_like(v)  # no Intra-FE part: a plain bottleneck adapter
        local = self.mix(local.to(v.dtype))
        stage_map = self.inter_stage_map(local, prev) if self.inter_stage else None
        local = local if stage_map is None else stage_map
        z = volume_to_tokens(v + local, z, self.layout)
        return tokens + self.act(self.up_projection(z)), stage_map

    def transform(self, tokens: torch.Tensor) -> torch.Tensor:
        prev = self.context.stage_map if self.inter_stage and self.reads_previous_stage else None
        # a snapshot: a recomputation in the backward pass must not see a later forward's geometry
        geometry = SliceContext(depth=self.context.depth, grid=self.context.grid)
        if self.recompute and torch.is_grad_enabled():
            out, stage_map = checkpoint(self.adapt, tokens, prev, geometry, use_reentrant=False,
                                        context_fn=functools.partial(_recomputation_keeps_statistics, self))
        else:
            out, stage_map = self.adapt(tokens, prev, geometry)
        if self.inter_stage:
            self.context.stage_map = stage_map
        return out


@contextlib.contextmanager
def _batchnorm_statistics_restored(module: nn.Module):
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    kept = [[buffer.clone() for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, kept):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def _recomputation_keeps_statistics(module: nn.Module):
    # The recomputation runs the BatchNorms in training mode again; their running statistics must count
    # this batch once, as without recomputation.
    return contextlib.nullcontext(), _batchnorm_statistics_restored(module)


@register_method
class MedAdapterMethod(InsertingMethod):
    name = "med_adapter"
    config_class = MedAdapterConfig

    def insert(self, model: nn.Module, config: MedAdapterConfig) -> nn.Module:
        sites = model.adapter_sites()
        stages = sorted({s.stage for s in sites if s.stage is not None})
        chosen = set(stages) if config.stages is None else set(config.stages)
        if not chosen <= set(stages):
            raise ValueError(f"stages {tuple(sorted(chosen))}: this network's stages are {tuple(stages)}")
        sites = [s for s in sites if s.stage in chosen or (config.stages is None and s.stage is None)]
        adapters = nn.ModuleList(MedAdapter(site, model.context, config,
                                            reads_previous_stage=site.stage is not None and site.stage - 1 in chosen)
                                 for site in sites)
        for site, adapter in zip(sites, adapters):
            site.module.register_forward_hook(OutputHook(adapter))
        return adapters
