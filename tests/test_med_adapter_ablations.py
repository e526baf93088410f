"""The paper's Med-Adapter ablations as options (Tables 4, 10, 11, 12): counts worked out from the layer shapes,
the paper's printed figures where it prints them, a forward and backward pass of each, and clear errors."""

from __future__ import annotations

import pytest
import torch

from medtuning.networks import build_network
from medtuning.networks.tools.summary import build_for_summary, parameter_summary

from .conftest import TINY_SWIN, TINY_VIT

PAPER = dict(in_channels=4, num_classes=4, img_size=128)
SWIN_WIDTHS = [96, 96, 192, 192, 384, 384, 768, 768]  # the eight Swin-UNet adapters' block widths, stage by stage


def inserted(model: str, **options) -> int:
    return parameter_summary(build_for_summary(model, "med_adapter", method_options=options, **PAPER))["inserted"]


def test_inter_fi_modes_on_swin_unet_at_alpha_4():
    # Table 12: the inter-stage alignment and fusion add 0.319 M at alpha = 4 (the FFT row's 1.243 M setting)
    off, concat = inserted("swin_unet", reduction=4, inter_stage="off"), inserted("swin_unet", reduction=4)
    assert concat == 1_242_608 and round((concat - off) / 1e6, 3) == 0.319
    hidden = [c // 4 for c in SWIN_WIDTHS[1::2]]  # the four stage-closing adapters
    align = sum(h // 2 * h * 9 + h for h in hidden)  # C'/2 -> C', kernel (1, 3, 3)
    fuse = sum(2 * h * h + h for h in hidden)  # 2C' -> C', 1x1x1
    assert concat - off == align + fuse
    for mode in ("add", "max"):
        assert inserted("swin_unet", reduction=4, inter_stage=mode) - off == align
    assert inserted("swin_unet", reduction=4, inter_stage=False) == off


@pytest.mark.parametrize("kernel", [9, 11])
def test_large_depthwise_global_branch_counts(kernel):
    # Table 10: the FFT filter's two weights per slice (T = 128) replaced by a 1xKxK + Kx1x1 depth-wise branch
    hidden = [c // 4 for c in SWIN_WIDTHS]
    branch = sum(h * kernel * kernel + h + h * kernel + h + 2 * h for h in hidden)  # two convs + BatchNorm
    fft = len(hidden) * 2 * 128
    assert (inserted("swin_unet", reduction=4, global_branch=f"dwconv{kernel}")
            == inserted("swin_unet", reduction=4) - fft + branch)


def test_intra_fe_parts_switch_off_down_to_a_plain_bottleneck():
    # Table 11's first row: no local branches, no global branch, no channel mixing, no Inter-FI
    vanilla = inserted("vit_b16_upernet", kernel_sizes=(), global_branch="none", channel_mixing=False, inter_stage=False)
    c, h = 768, 128
    assert vanilla == 12 * (c * h + h + h * c + c)
    with_mixing = inserted("vit_b16_upernet", kernel_sizes=(), global_branch="none", inter_stage=False)
    assert with_mixing - vanilla == 12 * (h * h + h)


def test_stages_choose_where_adapters_go():
    # Table 4: adapters in stages 2 and 3 only: the last four Swin-UNet adapters
    full = build_for_summary("swin_unet", "med_adapter", **PAPER)
    late = build_for_summary("swin_unet", "med_adapter", method_options={"stages": (2, 3)}, **PAPER)
    assert len(late.med_adapter) == 4
    per_adapter = [sum(p.numel() for p in a.parameters()) for a in full.med_adapter]
    assert parameter_summary(late)["inserted"] == sum(per_adapter[4:])
    assert not late.med_adapter[1].reads_previous_stage and late.med_adapter[3].reads_previous_stage


@pytest.mark.parametrize("name,options,shape", [("vit_b16_upernet", TINY_VIT, (1, 4, 8, 32, 32)),
                                                ("swin_unet", TINY_SWIN, (1, 4, 8, 64, 64))])
@pytest.mark.parametrize("method_options", [
    {"stages": (2, 3)}, {"stages": (0, 2)}, {"global_branch": "dwconv9"}, {"global_branch": "none"},
    {"kernel_sizes": (), "global_branch": "none", "channel_mixing": False}, {"inter_stage": "add"},
    {"inter_stage": "max"}, {"inter_stage": "off"}])
def test_every_ablation_trains(name, options, shape, method_options):
    torch.manual_seed(0)
    net = build_network(name, "med_adapter", method_options=method_options, **options).train()
    out = net(torch.randn(*shape))
    assert out.shape[2:] == shape[2:]
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.med_adapter.parameters() if p.requires_grad)


def test_the_plain_bottleneck_computes_its_formula():
    torch.manual_seed(0)
    net = build_network("vit_b16_upernet", "med_adapter", frozen_precision="float32", **TINY_VIT, method_options={
        "kernel_sizes": (), "global_branch": "none", "channel_mixing": False, "inter_stage": "off"}).eval()
    adapter = net.med_adapter[1]
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.1)
        x = torch.randn(8, 4, TINY_VIT["embed_dim"])  # 8 slices of 2x2 tokens
        net.context.begin(8)
        net.context.grid = (2, 2)
        gelu = torch.nn.functional.gelu
        expected = x + gelu(adapter.up_projection(gelu(adapter.down_projection(x))))
        torch.testing.assert_close(adapter(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options,message", [
    ({"stages": (4,)}, r"stages \(4,\): this network's stages are \(0, 1, 2, 3\)"),
    ({"global_branch": "fft3d"}, "global_branch 'fft3d': choose one of fft, dwconv9, dwconv11, none"),
    ({"inter_stage": "sum"}, "inter_stage 'sum': choose one of concat, add, max, off"),
    ({"kernel_sizes": (4,)}, r"kernel_sizes \(4,\): odd sizes"),
])
def test_bad_ablation_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        build_network("swin_unet", "med_adapter", method_options=options, **TINY_SWIN)


@pytest.mark.parametrize("decoder", ["upernet", "setr_naive", "setr_pup", "setr_mla"])
def test_every_vit_decoder_trains_with_med_adapters(decoder):
    # Table 13: the decoders take the same taps; logits at the input's size; the decoder and adapters learn
    torch.manual_seed(0)
    net = build_network("vit_b16_upernet", "med_adapter", decoder=decoder, **TINY_VIT).train()
    out = net(torch.randn(1, 4, 8, 32, 32))
    assert out.shape == (1, 4, 8, 32, 32)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.decoder.parameters())
    assert all(p.grad is not None for p in net.med_adapter.parameters())


def test_decoder_is_a_vit_option_only():
    with pytest.raises(ValueError, match="decoder 'fpn': choose one of upernet, setr_naive, setr_pup, setr_mla"):
        build_network("vit_b16_upernet", "med_adapter", decoder="fpn", **TINY_VIT)
    with pytest.raises(ValueError, match="network 'swin_unet' has no option.s. decoder; its options: in_channels"):
        build_network("swin_unet", "med_adapter", decoder="setr_naive", **TINY_SWIN)
