"""Head tuning: the pretrained backbone is frozen, only the decoder (and the position embedding and
final norm the paper counts with it) is tuned."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import PETMethod, PETState, freeze_modules, register_method


@dataclass
class HeadConfig:
    pass


@register_method
class HeadTuning(PETMethod):
    name = "head"
    config_class = HeadConfig

    def inject(self, model: nn.Module, config: HeadConfig) -> PETState:
        frozen = freeze_modules(model, model.frozen_modules())
        return PETState(self.name, {}, frozen=frozen)
