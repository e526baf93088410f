"""Foundation-model releases load as published and compute what their reference code computes.

The fixtures (``tests/fixtures/foundation``, written by ``make_fixtures.py`` with open_clip, MAE's, MoCo v3's
and DINOv2's repositories and segment_anything) are small random models saved in each release's exact
layout, with the per-block outputs the reference computed at the model's own size and at resized ones.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from medtuning.networks.weights import WeightLoadError, backbone_from_checkpoint, load_backbone_weights

FIXTURES = Path(__file__).parent / "fixtures" / "foundation"
TOL = 1e-4

RELEASES = {  # file -> (family, layout, what the file cannot tell)
    "clip_openai.pt": ("clip", "openai-clip", {"num_heads": 2}),
    "clip_openclip.bin": ("clip", "open_clip", {"num_heads": 2, "act": "gelu"}),
    "mae_pretrain.pth": ("mae", "mae", {"num_heads": 2}),
    "mocov3.pth.tar": ("mocov3", "mocov3", {"num_heads": 2}),
    "dinov2.pth": ("dinov2", "dinov2", {"num_heads": 2}),
    "dinov2_reg.pth": ("dinov2", "dinov2-reg4", {"num_heads": 2}),
    "sam_vit.pth": ("sam", "sam", {}),
}


def reference(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    path = FIXTURES / f"{Path(name).name.split('.')[0]}_reference.safetensors"
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).float() for k in f.keys()}, json.loads(f.metadata()["meta"])


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_block_outputs_match_the_reference(name):
    family, layout, overrides = RELEASES[name]
    backbone, report = backbone_from_checkpoint(FIXTURES / name, **overrides)
    assert backbone.family == family and report.layout == layout
    assert not report.missing and not report.unexpected, str(report)
    ref, meta = reference(name)
    backbone.eval()
    for size in meta["sizes"]:
        with torch.no_grad():
            outs = backbone.block_outputs(ref[f"input_{size}"])
        assert len(outs) == meta["depth"]
        for i, out in enumerate(outs):
            expected = ref[f"block{i}_{size}"]
            assert out.shape == expected.shape, (size, i)
            assert (out - expected).abs().max() < TOL, f"{name} at {size}: block {i} differs by " \
                f"{(out - expected).abs().max():.2e}"


def test_clip_activation_matters_and_open_clip_config_tells_it(tmp_path):
    """The default for a plain CLIP state dict is OpenAI's QuickGELU; an open_clip GELU model computes other
    features with it, and open_clip_config.json beside the file sets it right."""
    ref, _ = reference("clip_openclip.bin")
    wrong, report = backbone_from_checkpoint(FIXTURES / "clip_openclip.bin", num_heads=2)
    assert "assumed" in str(report)
    with torch.no_grad():
        assert (wrong.eval().block_outputs(ref["input_64"])[-1] - ref["block2_64"]).abs().max() > 1e-3
    copy = tmp_path / "open_clip_pytorch_model.bin"
    copy.write_bytes((FIXTURES / "clip_openclip.bin").read_bytes())
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": False}}))
    right, report = backbone_from_checkpoint(copy, num_heads=2)
    assert "open_clip_config.json" in str(report)
    with torch.no_grad():
        assert (right.eval().block_outputs(ref["input_64"])[-1] - ref["block2_64"]).abs().max() < TOL


def test_reports_say_what_is_not_used():
    text = {name: str(backbone_from_checkpoint(FIXTURES / name, **RELEASES[name][2])[1]) for name in RELEASES}
    assert "text tower" in text["clip_openai.pt"]
    assert "MAE's decoder" in text["mae_pretrain.pth"]
    assert "momentum encoder" in text["mocov3.pth.tar"]
    assert "mask token" in text["dinov2.pth"]
    assert "neck" in text["sam_vit.pth"] and "mask decoder" in text["sam_vit.pth"]


def test_sizes_are_read_from_the_tensors():
    sam, _ = backbone_from_checkpoint(FIXTURES / "sam_vit.pth")
    assert sam.global_attn_indexes == (1, 3) and [b.window_size for b in sam.blocks] == [4, 0, 4, 0]
    assert sam.blocks[0].attn.num_heads == 2 and sam.grid_size == (16, 16)
    dino, _ = backbone_from_checkpoint(FIXTURES / "dinov2_reg.pth", num_heads=2)
    assert dino.patch_size == 14 and dino.num_prefix_tokens == 5 and dino.pos_embed_resize == "bicubic_antialias"
    clip, _ = backbone_from_checkpoint(FIXTURES / "clip_openai.pt", num_heads=2, img_size=128, in_chans=4)
    assert clip.grid_size == (8, 8) and clip.patch_embed.proj.weight.shape[1] == 4 and clip.patch_embed.proj.bias is None


def test_a_release_into_the_wrong_family_is_one_clear_error():
    vit, _ = backbone_from_checkpoint(FIXTURES / "mae_pretrain.pth", num_heads=2)
    with pytest.raises(WeightLoadError, match="sam_vit.pth: a sam release"):
        load_backbone_weights(vit, FIXTURES / "sam_vit.pth")
