"""Our backbones reproduce timm's features from timm's own checkpoints (1e-4, float32, CPU)."""

import pytest
import torch
from safetensors.torch import load_file

from medtuning.networks.backbones.layers import adapt_input_conv
from medtuning.networks.backbones.swin import SwinTransformer
from medtuning.networks.backbones.vit import VisionTransformer
from medtuning.networks.weights import load_backbone_weights

from .conftest import shared_path

TOL = 1e-4


def vit(img_size=224, in_chans=3):
    return VisionTransformer(img_size=img_size, patch_size=16, in_chans=in_chans, embed_dim=96, depth=4,
                             num_heads=3).eval()


def swin():
    return SwinTransformer(img_size=224, patch_size=4, embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                           window_size=7).eval()


def assert_vit_matches(model, ref, size, tokens=True):
    """Block outputs (and, with ``tokens``, the final-norm tokens) equal timm's at ``size``."""
    with torch.no_grad():
        blocks = model.forward_intermediates(ref[f"input_{size}"], [0, 1, 2, 3])
        for i, out in enumerate(blocks):
            assert (out - ref[f"block{i}_{size}"]).abs().max() < TOL
        if tokens:
            assert (model.forward_features(ref[f"input_{size}"]) - ref[f"final_norm_tokens_{size}"]).abs().max() < TOL


@pytest.mark.parametrize("weights", ["vit_tiny_timm.safetensors", "vit_tiny_timm.pth"])
def test_vit_features_at_224(weights):
    ref = load_file(shared_path("fixtures", "timm_parity", "vit_tiny_reference.safetensors"))
    model = vit()
    report = load_backbone_weights(model, shared_path("fixtures", "timm_parity", weights))
    assert not report.missing and not report.unexpected
    assert_vit_matches(model, ref, 224)


def test_vit_features_at_128_resizing_on_the_fly():
    ref = load_file(shared_path("fixtures", "timm_parity", "vit_tiny_reference.safetensors"))
    model = vit()
    load_backbone_weights(model, shared_path("fixtures", "timm_parity", "vit_tiny_timm.safetensors"))
    assert_vit_matches(model, ref, 128)


def test_vit_built_at_128_resizes_position_embedding_when_loading():
    ref = load_file(shared_path("fixtures", "timm_parity", "vit_tiny_reference.safetensors"))
    model = vit(img_size=128)
    report = load_backbone_weights(model, shared_path("fixtures", "timm_parity", "vit_tiny_timm.safetensors"))
    assert "pos_embed" in report.resized and "14x14 -> 8x8" in report.resized["pos_embed"]
    assert model.pos_embed.shape == (1, 65, 96)
    assert_vit_matches(model, ref, 128, tokens=False)


def test_vit_without_class_token_drops_its_embedding():
    model = VisionTransformer(img_size=128, patch_size=16, embed_dim=96, depth=4, num_heads=3, class_token=False)
    report = load_backbone_weights(model, shared_path("fixtures", "timm_parity", "vit_tiny_timm.safetensors"))
    assert model.pos_embed.shape == (1, 64, 96)
    assert "cls_token" in report.unexpected
    assert "class-token entry dropped" in report.resized["pos_embed"]
    # the grid entries of the one loaded with its class token, not the class token's entry plus all but one
    with_token = vit(img_size=128)
    load_backbone_weights(with_token, shared_path("fixtures", "timm_parity", "vit_tiny_timm.safetensors"))
    torch.testing.assert_close(model.pos_embed, with_token.pos_embed[:, 1:], rtol=0, atol=0)


@pytest.mark.parametrize("weights,layout", [("swin_tiny_timm.safetensors", "timm"),
                                            ("swin_tiny_official.pth", "microsoft-swin")])
def test_swin_stage_features(weights, layout):
    ref = load_file(shared_path("fixtures", "timm_parity", "swin_tiny_reference.safetensors"))
    model = swin()
    report = load_backbone_weights(model, shared_path("fixtures", "timm_parity", weights))
    assert report.layout == layout
    assert not report.missing and not report.unexpected
    with torch.no_grad():
        stages = model.forward_stages(ref["input_224"])
    for i, (_, out) in enumerate(stages):
        assert (out.permute(0, 3, 1, 2) - ref[f"stage{i}_224"]).abs().max() < TOL


def test_four_channel_input_adapted_from_rgb_as_timm():
    src = load_file(shared_path("fixtures", "timm_parity", "vit_tiny_timm.safetensors"))["patch_embed.proj.weight"]
    model = vit(img_size=224, in_chans=4)
    report = load_backbone_weights(model, shared_path("fixtures", "timm_parity", "vit_tiny_timm.safetensors"))
    assert "patch_embed.proj.weight" in report.resized
    expected = torch.cat([src, src[:, :1]], dim=1) * 0.75
    assert torch.allclose(model.patch_embed.proj.weight, expected)
    # one channel: RGB kernels summed
    assert torch.allclose(adapt_input_conv(1, src), src.sum(1, keepdim=True))
