"""The paper's setting runs on CPU: a 4-channel 128^3 volume through Med-Tuning, forward and backward."""

import pytest
import torch

from medtuning.networks import build_network


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_b16_upernet", "swin_unet"])
def test_forward_backward_on_128_cubed_volume(name):
    torch.manual_seed(0)
    net = build_network(name, "med_adapter", in_channels=4, num_classes=4, img_size=128).train()
    x = torch.randn(1, 4, 128, 128, 128)
    out = net(x)
    assert out.shape == (1, 4, 128, 128, 128)
    out.float().logsumexp(1).mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in net.parameters() if not p.requires_grad)
