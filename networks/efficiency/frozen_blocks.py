"""Cheaper training for frozen backbones: bfloat16 weights and compute, recomputed or narrowed activations.

A frozen block still runs forward and backward: the adapters before it need the gradient with respect
to its input. Two things follow from it being frozen:

* **Its weights and compute can be bfloat16** (``frozen_precision``). None of its weights is ever
  updated, so the reason mixed-precision training keeps float32 master weights does not apply; only the
  features it hands on and the input gradient it passes back carry bfloat16 rounding, as under autocast.
  When the network is built, the frozen blocks' matrices are converted to bfloat16 once (half their
  memory, no per-step casts; from then on they stay bit-identical through training). Each block runs
  under ``torch.autocast(bfloat16)`` and its output is cast back to its input's dtype, so the adapters,
  the decoder and the loss stay in float32. ``"auto"`` (the default) does this where the hardware
  computes bfloat16 natively (the GPU when there is one, else a CPU with AVX512-BF16 or AMX) and keeps
  float32 elsewhere, where bfloat16 would only be emulated.
* **The activations it saves only serve that input gradient** (no weight gradient is formed from
  them), so they need not be stored at all: ``frozen_activations="recompute"`` keeps only each frozen
  block's input and runs the block's forward again when the backward pass reaches it (activation
  checkpointing: one more bfloat16 forward of the frozen blocks per step for the least memory;
  gradients equal). ``"bfloat16"`` stores them in bfloat16 and widens them again when the backward
  pass reads them (no recomputation, more memory); ``"float32"`` keeps them as computed. What the
  recomputation costs depends on the network: a few per cent of Swin-UNet's step, whose decoder
  dominates, ~30 % of ViT-B/16 + UPerNet's, so the default (``"auto"``) lets each network choose.
  Frozen Swin blocks do their recomputation and backward pass by hand (:mod:`networks.efficiency.frozen_swin`).
  Tuned modules keep exact saved tensors (Med-Adapters recompute themselves,
  :mod:`networks.pet.med_adapter`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch import nn
# The generator behind torch's hook-driven activation checkpointing (torch.distributed._composable's
# ``checkpoint``), used the same way: started in a forward pre-hook, finished in a forward hook.
from torch.utils.checkpoint import _checkpoint_without_reentrant_generator, noop_context_fn

from .frozen_swin import use_hand_written_backward, uses_hand_written_backward

__all__ = ["configure_frozen_blocks", "RecomputeRecipe", "default_device_type", "native_bfloat16",
           "FROZEN_PRECISIONS", "FROZEN_ACTIVATIONS", "MIN_COMPRESSED_NUMEL", "check_frozen_options"]

MIN_COMPRESSED_NUMEL = 1 << 16  # small saved tensors (softmax log-sum-exp, statistics) stay exact
FROZEN_PRECISIONS = ("auto", "bfloat16", "float32")
# "auto": the network's choice (its ``frozen_activations_auto``, else "recompute")
FROZEN_ACTIVATIONS = ("auto", "recompute", "bfloat16", "float32")
MATRIX_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@functools.cache
def native_bfloat16(device_type: str) -> bool:
    """Whether this machine computes bfloat16 natively on ``device_type`` ('cpu' or 'cuda')."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def default_device_type() -> str:
    """Where a network built now will most likely run: the accelerator (GPU) if there is one."""
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return accelerator.type if accelerator else "cpu"


def _pack(t: torch.Tensor) -> tuple[torch.dtype, torch.Tensor] | torch.Tensor:
    if t.grad_fn is None or t.dtype != torch.float32 or t.numel() < MIN_COMPRESSED_NUMEL:
        return t  # parameters, inputs and small tensors as they are
    return (t.dtype, t.to(torch.bfloat16))


def _unpack(packed: tuple[torch.dtype, torch.Tensor] | torch.Tensor) -> torch.Tensor:
    if isinstance(packed, tuple):
        dtype, t = packed
        return t.to(dtype)
    return packed


def _cast(output, dtype: torch.dtype):
    if isinstance(output, torch.Tensor):
        return output.to(dtype) if output.is_floating_point() else output
    if isinstance(output, tuple):
        return tuple(_cast(o, dtype) for o in output)
    return output


# (block, its forward's positional args) -> (a function of ``inputs`` equal to the block's forward, inputs)
RecomputeRecipe = Callable[[nn.Module, tuple], tuple[Callable, tuple]]


def _own_inputs(module: nn.Module, args: tuple) -> tuple[Callable, tuple]:
    return module.forward, args


@contextlib.contextmanager
def _recomputed(forward, *args):
    # fn, preserve_rng_state (drop path), context_fn, determinism_check, debug, early_stop, *args
    yield from _checkpoint_without_reentrant_generator(forward, True, noop_context_fn, "default", False, True, *args)


class _FrozenBlockScope:
    """Entered by a forward pre-hook before a frozen block runs and left by a forward hook right after it
    (before any forward hook an adapter added runs, and also when the block raised). Inside: bfloat16
    autocast, and either compressed saved tensors or a checkpoint that recomputes the block."""

    def __init__(self, activations: str, bfloat16: bool, recipe: RecomputeRecipe | None = None) -> None:
        self.activations = activations
        self.bfloat16 = bfloat16
        self.recipe = recipe or _own_inputs
        self.stack: list[tuple[list, torch.dtype | None]] = []

    def enter(self, module: nn.Module, args: tuple) -> None:
        contexts, dtype = [], None
        x = args[0] if args else None
        if self.bfloat16 and isinstance(x, torch.Tensor) and x.dtype == torch.float32:
            contexts.append(torch.autocast(x.device.type, dtype=torch.bfloat16))
            dtype = x.dtype
        if torch.is_grad_enabled() and self.activations == "bfloat16":
            contexts.append(torch.autograd.graph.saved_tensors_hooks(_pack, _unpack))
        if torch.is_grad_enabled() and self.activations == "recompute" and not uses_hand_written_backward(module, x):
            # entered inside the autocast above, which the recomputation restores; it calls
            # ``module.forward`` (no hooks), so neither this scope nor any adapter runs twice
            forward, inputs = self.recipe(module, args)
            contexts.append(_recomputed(forward, *inputs))
        for context in contexts:
            context.__enter__()
        self.stack.append((contexts, dtype))

    def leave(self, module: nn.Module, args: tuple, output):
        if not self.stack:
            return None
        contexts, dtype = self.stack.pop()
        for context in reversed(contexts):
            context.__exit__(None, None, None)
        return _cast(output, dtype) if dtype is not None else None


def check_frozen_options(activations: str, precision: str) -> None:
    """A clear error for a value outside :data:`FROZEN_ACTIVATIONS` / :data:`FROZEN_PRECISIONS`."""
    for name, value, choices in (("frozen_activations", activations, FROZEN_ACTIVATIONS),
                                 ("frozen_precision", precision, FROZEN_PRECISIONS)):
        if value not in choices:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def configure_frozen_blocks(model: nn.Module, activations: str = "auto", precision: str = "auto",
                            blocks: list[nn.Module] | None = None, recomputable: bool = True) -> int:
    """Run frozen blocks in bfloat16 (``precision``) and keep their saved activations as ``activations``
    says (:data:`FROZEN_ACTIVATIONS`); returns how many blocks. ``blocks`` defaults to the network's
    adapter sites and the layers between them that its ``frozen_layers()`` lists (Swin's patch mergings),
    those whose parameters are all frozen (a block holding tuned parameters, e.g. LoRA's, is left alone).
    ``recomputable=False`` (a method whose hooks inside a block share state that a recomputation would
    read stale) keeps ``"bfloat16"`` where ``"recompute"`` was asked for or chosen.

    Where ``"recompute"`` applies, a frozen Swin block with nothing hooked inside it forms its input gradient
    by hand (:mod:`networks.efficiency.frozen_swin`: the same gradient, recomputed more cheaply); other blocks
    are checkpointed. Either way a block keeps only its forward's inputs for the
    backward pass. A network whose blocks are also handed something large that is cheap to build again
    (SwinUNETR's attention masks) says so with a ``recompute_recipe(block, args) -> (forward, inputs)``
    method (:data:`RecomputeRecipe`): only ``inputs`` are kept and ``forward(*inputs)`` must compute what
    ``block(*args)`` did."""
    check_frozen_options(activations, precision)
    if activations == "auto":
        activations = getattr(model, "frozen_activations_auto", "recompute")
    if activations == "recompute" and not recomputable:
        activations = "bfloat16"
    bfloat16 = precision == "bfloat16" or (precision == "auto" and native_bfloat16(default_device_type()))
    if activations == "float32" and not bfloat16:
        return 0
    if blocks is None:
        blocks = [s.module for s in model.adapter_sites()] + list(getattr(model, "frozen_layers", list)())
    blocks = [b for b in blocks if not any(p.requires_grad for p in b.parameters())]
    for block in blocks:
        if bfloat16:
            # the frozen matrices themselves become bfloat16: half their memory, no per-step casts (whose
            # copies autograd would keep for the backward pass); norms keep float32, as autocast runs them
            for layer in block.modules():
                if isinstance(layer, MATRIX_LAYERS):
                    layer.to(torch.bfloat16)
        if activations == "recompute":
            use_hand_written_backward(block)  # where it computes what the block does
        scope = _FrozenBlockScope(activations, bfloat16, getattr(model, "recompute_recipe", None))
        block.register_forward_pre_hook(scope.enter)
        block.register_forward_hook(scope.leave, prepend=True, always_call=True)
    return len(blocks)
