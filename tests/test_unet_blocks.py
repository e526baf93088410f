"""networks.efficiency.unet_blocks: MONAI's residual U-Net blocks keeping fewer activations, with MONAI's math."""

import copy

import pytest
import torch
from monai.networks.blocks.dynunet_block import UnetResBlock
from monai.networks.blocks.unetr_block import UnetrBasicBlock, UnetrUpBlock

from medtuning.networks.models import build_network
from medtuning.networks.efficiency.unet_blocks import (MemoryEfficientUnetrUpBlock, MemoryEfficientUnetResBlock,
                                  use_memory_efficient_blocks)

from .conftest import TINY_SWINUNETR, forward_keeping_saved

DOUBLE = torch.float64
BLOCKS = {
    # shortcut through a 1x1x1 conv + norm (channels change), as SwinUNETR's encoder1
    "projected shortcut": (lambda: UnetrBasicBlock(3, 2, 8, 3, 1, "instance", res_block=True),
                           [(2, 2, 6, 7, 5)]),
    # identity shortcut, as encoder2..4 and encoder10
    "identity shortcut": (lambda: UnetrBasicBlock(3, 8, 8, 3, 1, "instance", res_block=True), [(2, 8, 6, 7, 5)]),
    # strided, as a DynUNet down block
    "strided": (lambda: UnetResBlock(3, 4, 8, 3, 2, "instance"), [(1, 4, 8, 6, 10)]),
    # up-block: upsampled map and skip, as decoder1..5
    "up-block": (lambda: UnetrUpBlock(3, 16, 8, 3, 2, "instance", res_block=True),
                 [(2, 16, 3, 4, 3), (2, 8, 6, 8, 6)]),
}


def _lean_copy(block: torch.nn.Module) -> torch.nn.Module:
    lean = copy.deepcopy(block)
    assert use_memory_efficient_blocks(lean) == 1
    return lean


def _run(block, inputs, grad_out=None):
    inputs = [x.clone().requires_grad_() for x in inputs]
    out = block(*inputs)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    out.backward(grad_out)
    return out, grad_out, [x.grad for x in inputs], [p.grad for p in block.parameters()]


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_memory_efficient_blocks_compute_monais_outputs_and_gradients(kind):
    make, shapes = BLOCKS[kind]
    torch.manual_seed(0)
    stock = make().to(DOUBLE)
    lean = _lean_copy(stock)
    assert isinstance(lean, (MemoryEfficientUnetResBlock, MemoryEfficientUnetrUpBlock)) or \
        isinstance(lean.layer, MemoryEfficientUnetResBlock)
    assert lean.state_dict().keys() == stock.state_dict().keys()
    inputs = [torch.randn(*s, dtype=DOUBLE) for s in shapes]
    out, grad_out, input_grads, param_grads = _run(stock, inputs)
    lean_out, _, lean_input_grads, lean_param_grads = _run(lean, inputs, grad_out)
    torch.testing.assert_close(lean_out, out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lean_input_grads, input_grads, rtol=0, atol=1e-11)
    torch.testing.assert_close(lean_param_grads, param_grads, rtol=0, atol=1e-10)


def test_memory_efficient_blocks_keep_no_convolution_output_and_no_concatenation():
    torch.manual_seed(0)
    stock = UnetrUpBlock(3, 16, 8, 3, 2, "instance", res_block=True)
    lean = _lean_copy(stock)
    low, skip = torch.randn(1, 16, 8, 8, 8, requires_grad=True), torch.randn(1, 8, 16, 16, 16, requires_grad=True)
    given = {low.untyped_storage().data_ptr(), skip.untyped_storage().data_ptr()}  # held by their makers anyway
    full_res = (1, 8, 16, 16, 16)
    kept = {}
    for name, block in (("stock", stock), ("lean", lean)):
        _, saved = forward_keeping_saved(lambda x, b=block: b(x, skip), low)
        storages = {t.untyped_storage().data_ptr(): t for t in saved}  # a tensor kept twice counts once
        kept[name] = sorted(tuple(t.shape) for ptr, t in storages.items()
                            if ptr not in given and t.dim() == 5 and t.shape[2:] == full_res[2:])
    # MONAI: the concatenation (read by two convolutions), the three convolution outputs, the first
    # activation and the output. Here: the upsampled map, the first activation, one normalised map and
    # the output; 4/7 of the bytes
    assert kept["stock"] == sorted([(1, 16, 16, 16, 16)] + [full_res] * 5)
    assert kept["lean"] == [full_res] * 4


@pytest.mark.parametrize("make", [
    lambda: UnetResBlock(3, 4, 8, 3, 1, "batch"),
    lambda: UnetResBlock(3, 4, 8, 3, 1, ("instance", {"affine": True})),
    lambda: UnetResBlock(3, 4, 8, 3, 1, "instance", dropout=0.1),
    lambda: UnetResBlock(3, 4, 8, 3, 1, "instance", act_name="relu"),
], ids=["batch norm", "affine instance norm", "dropout", "relu"])
def test_unsupported_blocks_keep_monais_forward(make):
    block = make()
    assert use_memory_efficient_blocks(block) == 0
    assert type(block) is UnetResBlock


def test_swinunetr_with_memory_efficient_blocks_trains_as_monais():
    """The whole network (full fine-tuning, float64: in float32 the two orders of rounding part by up to
    1e-4 on this input): same keys, same loss, same gradients everywhere."""
    nets, grads, losses = {}, {}, {}
    x = torch.randn(1, 1, 32, 64, 64, dtype=DOUBLE)
    for lean in (False, True):
        torch.manual_seed(0)
        nets[lean] = build_network("swinunetr", "full", memory_efficient_blocks=lean,
                                   **{**TINY_SWINUNETR, "img_size": 32}).to(DOUBLE)
    nets[True].load_state_dict(nets[False].state_dict())
    assert sum(isinstance(m, MemoryEfficientUnetResBlock) for m in nets[True].modules()) == 10
    assert not any(isinstance(m, MemoryEfficientUnetResBlock) for m in nets[False].modules())
    for lean, net in nets.items():
        loss = net(x).square().mean()
        loss.backward()
        losses[lean], grads[lean] = loss.detach(), [p.grad for p in net.parameters()]
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-12, atol=0)
    for lean_grad, grad in zip(grads[True], grads[False]):
        assert (lean_grad - grad).norm() <= 1e-11 * grad.norm()  # measured: up to 7e-14


def test_memory_efficient_blocks_refuse_second_derivatives():
    block = _lean_copy(UnetrBasicBlock(3, 4, 4, 3, 1, "instance", res_block=True))
    x = torch.randn(1, 4, 6, 6, 6, requires_grad=True)
    (grad,) = torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|second"):
        grad.sum().backward()


def test_up_block_with_a_skip_of_the_wrong_width_names_both_widths():
    block = _lean_copy(UnetrUpBlock(3, 16, 8, 3, 2, "instance", res_block=True))
    with pytest.raises(ValueError, match="parts have 20 channels, the convolution takes 16"):
        block(torch.randn(1, 16, 3, 3, 3), torch.randn(1, 12, 6, 6, 6))
