"""Patch merging as releases trained with an older MONAI SwinUNETR compute it.

MONAI's 3D patch merging before its 2022 fix concatenated the eight 2x2x2 neighbours with two of
them twice (offsets (0,1,0) and (0,0,1)) and two never ((1,1,0) and (0,1,1)); its padding of odd sizes also
shifted the axes. MONAI kept that order out of its code, but weights trained with it compute with it: the
CLIP-Driven Universal Model's SwinUNETR release (``model/SwinUNETR.py`` in its repository) does, and
``tests/test_foundation_backbones.py`` shows its features only match with this merging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import PatchMergingV2

__all__ = ["LegacyPatchMerging"]

# (depth, height, width) offsets in the order the old code concatenated them
LEGACY_OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))


class LegacyPatchMerging(PatchMergingV2):
    """MONAI's ``PatchMergingV2`` parameters (``norm``, ``reduction``) with the old 3D neighbour order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            return super().forward(x)
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, d % 2, 0, w % 2, 0, h % 2))  # the old code's padding, axes as it wrote them
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in LEGACY_OFFSETS], -1)
        return self.reduction(self.norm(x))
