"""Per-forward geometry shared between a network and the modules a PET method inserts into it.

A 2D backbone sees ``B*D`` slices; modules inserted after its blocks (Med-Adapters) need to know
``D`` to rebuild the volume, the token grid of a ViT, and the inter-stage map carried from one stage
to the next. The network that owns the backbone fills this in at the start of every forward, so an
inserted module never sees stale values from an earlier call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SliceContext"]


@dataclass
class SliceContext:
    depth: int | None = None  # slices per volume; None for native 3D networks
    grid: tuple[int, int] | None = None  # ViT token grid (h, w)
    num_prefix_tokens: int = 0  # class/prompt tokens before the patch tokens
    stage_map: torch.Tensor | None = None  # Med-Adapter inter-stage map of the previous stage

    def begin(self, depth: int | None) -> None:
        """Reset for a new forward pass over volumes of ``depth`` slices."""
        self.depth = depth
        self.grid = None
        self.num_prefix_tokens = 0
        self.stage_map = None
