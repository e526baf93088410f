"""Full fine-tuning: every parameter of the pretrained network is tuned."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import PETMethod, PETState, freeze_modules, register_method


@dataclass
class FullConfig:
    pass


@register_method
class FullFineTuning(PETMethod):
    name = "full"
    config_class = FullConfig

    def inject(self, model: nn.Module, config: FullConfig) -> PETState:
        freeze_modules(model, [])
        return PETState(self.name, {})
