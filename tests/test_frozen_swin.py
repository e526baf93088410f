"""Frozen Swin blocks with the hand-written input-gradient backward (networks.efficiency.frozen_swin): the same outputs
and input gradients as autograd, whatever the chunking, shift, stochastic depth and precision; only the
input kept; which blocks of which methods take it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import medtuning.networks.efficiency.frozen_swin as frozen_swin
from medtuning.networks import build_network
from medtuning.networks.backbones.swin import SwinTransformerBlock
from medtuning.networks.efficiency.frozen_swin import (HandWrittenBackwardSwinBlock, frozen_swin_block,
                                                       use_hand_written_backward, uses_hand_written_backward)

from .conftest import TINY_SWIN, assert_gradients_close, forward_keeping_saved, tuned_gradients


def frozen_block(shift: bool, drop_path: float = 0.0, precision: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    block = SwinTransformerBlock(24, (8, 8), num_heads=2, window_size=4, shift=shift, drop_path=drop_path)
    with torch.no_grad():  # a trained-looking bias table, so that a wrong window or bias shows
        block.attn.relative_position_bias_table.normal_()
    block.requires_grad_(False)
    for layer in block.modules():
        if isinstance(layer, nn.Linear):
            layer.to(precision)
    return block


def output_and_input_gradient(run, x: torch.Tensor, grad: torch.Tensor, seed: int = 1):
    torch.manual_seed(seed)  # the same stochastic-depth draws on both paths
    v = x.clone().requires_grad_()
    out = run(v)
    out.backward(grad)
    return out.detach(), v.grad


def autograd_path(block: nn.Module):
    def run(v):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=block.attn.qkv.weight.dtype == torch.bfloat16):
            return block(v).float()
    return run


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("chunk_elements", [1 << 20, 2 * 24 * 16, 8 * 24 * 16],
                         ids=["one chunk", "windows of one map", "two maps, last chunk one map"])
def test_equals_autograd_in_float32(shift, chunk_elements, monkeypatch):
    monkeypatch.setitem(frozen_swin.CHUNK_ELEMENTS, "cpu", chunk_elements)
    block = frozen_block(shift, drop_path=0.5).train()
    x, grad = torch.randn(3, 8, 8, 24), torch.randn(3, 8, 8, 24)
    ours = output_and_input_gradient(lambda v: frozen_swin_block(block, v), x, grad)
    reference = output_and_input_gradient(block, x, grad)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the branches themselves, not only the residual stream that carries x and grad through
    torch.testing.assert_close(ours[0] - x, reference[0] - x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[1] - grad, reference[1] - grad, rtol=1e-4, atol=1e-5)


def test_stochastic_depth_drops_what_droppath_drops():
    block = frozen_block(True, drop_path=0.5).train()
    x, grad = torch.randn(16, 8, 8, 24), torch.randn(16, 8, 8, 24)
    out, _ = output_and_input_gradient(lambda v: frozen_swin_block(block, v), x, grad, seed=3)
    reference, _ = output_and_input_gradient(block, x, grad, seed=3)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    block.drop_path1.drop_prob = block.drop_path2.drop_prob = 0.0  # then some samples would differ
    undropped, _ = output_and_input_gradient(lambda v: frozen_swin_block(block, v), x, grad, seed=3)
    assert not torch.allclose(undropped, reference, atol=1e-4)


@pytest.mark.parametrize("shift", [False, True])
def test_bfloat16_is_as_close_to_float32_as_autocast(shift):
    block = frozen_block(shift, precision=torch.bfloat16).train()
    exact = frozen_block(shift).train()
    x, grad = torch.randn(4, 8, 8, 24), torch.randn(4, 8, 8, 24)
    reference = output_and_input_gradient(exact, x, grad)
    ours = output_and_input_gradient(lambda v: frozen_swin_block(block, v), x, grad)
    autocast = output_and_input_gradient(autograd_path(block), x, grad)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32

    def error(result, exact, through):  # relative error of the branch, the residual taken out
        return ((result - exact).norm() / (exact - through).norm()).item()

    for i, through in enumerate((x, grad)):
        assert error(ours[i], reference[i], through) < 2e-2
        assert error(ours[i], reference[i], through) <= 1.25 * error(autocast[i], reference[i], through)


def test_keeps_only_its_input_and_the_drop_masks():
    block = frozen_block(True, drop_path=0.2).train()
    x = torch.randn(3, 8, 8, 24, requires_grad=True)
    out, saved = forward_keeping_saved(lambda v: frozen_swin_block(block, v), x)
    assert saved[0] is x and [tuple(t.shape) for t in saved[1:]] == [(3, 1, 1, 1)] * 2


def test_a_map_of_partial_windows_takes_the_autograd_path():
    block = frozen_block(True)
    assert use_hand_written_backward(block)
    x = torch.randn(2, 10, 10, 24, requires_grad=True)
    assert not uses_hand_written_backward(block, x)
    assert uses_hand_written_backward(block, torch.randn(2, 8, 8, 24))
    with torch.no_grad():
        assert not uses_hand_written_backward(block, torch.randn(2, 8, 8, 24))  # inference: the shared forward
    block(x).sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("method,expected", [("med_adapter", True), ("head", True), ("dvpt", True),
                                             ("st_adapter", True), ("pro_tuning", True),
                                             ("adapter", False), ("adaptformer", False), ("ssf", False),
                                             ("lora", False), ("vpt_deep", False), ("full", False)])
def test_which_blocks_take_it(method, expected):
    # hooks on the block itself (adapters after or before it) are fine; hooks inside it, tuned parameters in it
    # (LoRA, full) or a method that cannot be recomputed (VPT) keep autograd
    net = build_network("swin_unet", method, **TINY_SWIN)
    encoder = [b for stage in net.backbone.layers for b in stage.blocks]
    decoder = [b for stage in net.decoder.layers_up[1:] for b in stage.blocks]
    assert {isinstance(b, HandWrittenBackwardSwinBlock) for b in encoder} == {expected}
    assert not any(isinstance(b, HandWrittenBackwardSwinBlock) for b in decoder)  # tuned in every method
    narrowed = build_network("swin_unet", method, frozen_activations="bfloat16", **TINY_SWIN)
    assert not any(isinstance(b, HandWrittenBackwardSwinBlock) for stage in narrowed.backbone.layers
                   for b in stage.blocks)


def test_med_tuning_gradients_equal_checkpointing_in_float32():
    grads = {}
    for hand_written in (True, False):
        torch.manual_seed(0)
        net = build_network("swin_unet", "med_adapter", frozen_precision="float32",
                            **dict(TINY_SWIN, drop_path_rate=0.3)).train()
        for stage in net.backbone.layers:
            for block in stage.blocks:
                assert isinstance(block, HandWrittenBackwardSwinBlock)
                assert use_hand_written_backward(block, hand_written) is hand_written
        torch.manual_seed(1)
        net(torch.randn(1, 4, 8, 64, 64)).square().mean().backward()
        grads[hand_written] = tuned_gradients(net)
    assert_gradients_close(grads[True], grads[False], rtol=1e-5)


def test_frozen_patch_mergings_run_like_the_blocks():
    # bfloat16 matrices and only their input kept, like the blocks around them; tuned ones stay float32
    merging = {}
    for method in ("med_adapter", "full"):
        net = build_network("swin_unet", method, frozen_precision="bfloat16", **TINY_SWIN)
        merging[method] = [stage.downsample for stage in net.backbone.layers[1:]]
        assert merging[method] == net.frozen_layers()
    assert {m.reduction.weight.dtype for m in merging["med_adapter"]} == {torch.bfloat16}
    assert {m.norm.weight.dtype for m in merging["med_adapter"]} == {torch.float32}
    assert all(m.reduction.weight.dtype == torch.float32 and m.reduction.weight.requires_grad
               for m in merging["full"])
    x = torch.randn(2, 8, 8, 24, requires_grad=True)
    out, saved = forward_keeping_saved(merging["med_adapter"][0], x)
    assert out.dtype == torch.float32 and [t is x for t in saved] == [True]
