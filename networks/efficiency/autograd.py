"""Hand-written autograd functions that also export: TorchScript tracing cannot hold a Python autograd function."""

from __future__ import annotations

import torch

__all__ = ["apply_function"]


class _NoBackward:
    """Stands in for an autograd context where no backward pass will follow: whatever it is told to keep is dropped."""

    needs_input_grad = ()

    def save_for_backward(self, *tensors) -> None:
        pass


def apply_function(function: type[torch.autograd.Function], *args):
    """``function.apply(*args)``, except while tracing (TorchScript export): a traced graph cannot hold a Python
    autograd function, so its forward runs as plain operations, which is what inference needs."""
    if torch.jit.is_tracing():
        return function.forward(_NoBackward(), *args)
    return function.apply(*args)
