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


# --- in the segmentation network --------------------------------------------------------------------------------

from medtuning.networks import available_methods, build_network  # noqa: E402
from medtuning.networks.tools.summary import build_for_summary, parameter_summary  # noqa: E402


def tiny_network(name: str, method: str, **options):
    overrides = dict(RELEASES[name][2])
    if "act" in overrides:
        overrides["backbone_options"] = {"act": overrides.pop("act")}
    return build_network("vit_b16_upernet", method, pretrained=FIXTURES / name, in_channels=4, num_classes=3,
                         img_size=32, num_slices=4, decoder_channels=16,
                         out_indices=(0, 1, 2, 3) if name.startswith("sam") else (0, 1, 2), **overrides, **options)


@pytest.mark.parametrize("name", sorted(RELEASES))
@pytest.mark.parametrize("method", [m for m in available_methods() if m != "scratch"])
def test_every_method_tunes_every_release(name, method):
    """Each PET method attaches to each pretrained family the same way; only what it tunes gets gradients."""
    if name.startswith("sam") and method.startswith("vpt"):
        with pytest.raises(ValueError, match="SAM's windowed encoder"):
            tiny_network(name, method)
        return
    torch.manual_seed(0)
    model = tiny_network(name, method)
    assert model.network_options["family"] == RELEASES[name][0]
    model(torch.randn(1, 4, 4, 32, 32)).square().mean().backward()
    counts = parameter_summary(model)
    grads = sum(p.numel() for p in model.parameters() if p.grad is not None)
    assert grads == counts["tuned"] > 0
    if method not in ("full", "head", "ssf", "lora"):
        assert counts["inserted"] > 0
    if method != "full":
        assert all(p.grad is None for p in model.backbone.blocks.parameters() if not p.requires_grad)


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_a_saved_network_is_rebuilt_from_its_options_without_the_file(name):
    """Training writes network_options (family and sizes read from the file); inference rebuilds from them."""
    model = tiny_network(name, "med_adapter")
    again = build_network("vit_b16_upernet", "med_adapter", **model.network_options)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    again.load_state_dict(model.state_dict())
    x = torch.randn(1, 4, 4, 32, 32)
    with torch.no_grad():
        assert torch.allclose(again.eval()(x), model.eval()(x), atol=1e-5)


def test_dinov2_pads_slices_to_whole_patches():
    model = tiny_network("dinov2.pth", "med_adapter").eval()
    assert model.backbone.grid_size == (3, 3)  # 32 -> 42 = 3 x 14
    with torch.no_grad():
        out = model(torch.randn(1, 4, 4, 32, 32))
    assert out.shape == (1, 3, 4, 32, 32)


def test_options_that_contradict_the_file_are_one_error():
    with pytest.raises(ValueError, match="dinov2.pth: the file is a dinov2 ViT with patch_size=14"):
        tiny_network("dinov2.pth", "med_adapter", patch_size=16)
    with pytest.raises(ValueError, match="num_registers=4, but the network options say num_registers=2"):
        tiny_network("dinov2_reg.pth", "med_adapter", backbone_options={"num_registers": 2})
    with pytest.raises(ValueError, match="backbone_options window: not options of the clip backbone"):
        build_network("vit_b16_upernet", "med_adapter", family="clip", backbone_options={"window": 3})


PAPER_VIT = {"tuned": 17_853_000, "inserted": 2_845_696}  # Med-Tuning, ViT-B/16 at 128, alpha 6 (Tables 1-3)


@pytest.mark.parametrize("family,options,extra_tokens", [
    ("clip", {}, 2), ("mae", {}, 2), ("mocov3", {}, 2),
    ("dinov2", {"patch_size": 14}, 2), ("dinov2", {"patch_size": 14, "backbone_options": {"num_registers": 4}}, 6),
])
def test_paper_size_counts_per_family(family, options, extra_tokens):
    """Med-Adapters insert the paper's 2.846 M on every ViT-B/16 family; what is tuned besides differs only by the
    family's own tokens (class token and its position entry, registers), and DINOv2's 14-pixel patches give
    128 -> 140 pixels, a 10 x 10 grid (36 more position entries than 8 x 8)."""
    model = build_for_summary("vit_b16_upernet", "med_adapter", family=family, **options)
    counts = parameter_summary(model)
    assert counts["inserted"] == PAPER_VIT["inserted"]
    grid = (model.backbone.grid_size[0] * model.backbone.grid_size[1] - 64) * 768
    timm = parameter_summary(build_for_summary("vit_b16_upernet", "med_adapter"))
    assert counts["tuned"] - timm["tuned"] == grid + extra_tokens * 768
    assert abs(timm["tuned"] - PAPER_VIT["tuned"]) < 500


def test_universal_model_swinunetr_matches_its_reference():
    """The CLIP-Driven Universal Model's SwinUNETR release loads into MONAI's SwinUNETR; its encoder and decoder
    compute what the Universal Model's own backbone computed (written by its repository's code)."""
    from medtuning.networks.models import SwinUNETRNet

    with safe_open(str(FIXTURES / "universal_swin_unetr_reference.safetensors"), "pt") as f:
        ref = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["meta"])
    model = SwinUNETRNet(in_channels=1, num_classes=5, img_size=64, feature_size=meta["feature_size"],
                         depths=meta["depths"], num_heads=meta["num_heads"]).eval()
    report = model.load_pretrained(FIXTURES / "universal_swin_unetr.pth")
    assert report.layout == "universal-model" and not report.unexpected
    assert report.missing and all(k.startswith("out.") for k in report.missing)
    assert "CLIP-driven head" in str(report) and "controller" in str(report)
    seen = {}
    model.encoder10.register_forward_hook(lambda m, a, out: seen.__setitem__("dec4", out))
    model.decoder1.register_forward_hook(lambda m, a, out: seen.__setitem__("decoder1", out))
    with torch.no_grad():
        model(ref["input_64_u8"].float() / 64 - 2)
    assert (seen["dec4"] - ref["dec4_64"]).abs().max() < TOL
    assert (seen["decoder1"][..., ::4, ::4, ::4] - ref["decoder1_64_every4"]).abs().max() < TOL
    model.use_merging("merging")  # today's MONAI merging computes other features with the same weights
    with torch.no_grad():
        model(ref["input_64_u8"].float() / 64 - 2)
    assert (seen["dec4"] - ref["dec4_64"]).abs().max() > 1e-2


def test_universal_model_weights_through_build_network_are_rebuilt_the_same():
    model = build_network("swinunetr", "med_adapter", pretrained=FIXTURES / "universal_swin_unetr.pth",
                          in_channels=1, num_classes=3, img_size=32, feature_size=12, depths=(1, 1, 1, 1),
                          num_heads=(1, 1, 1, 1))
    assert model.network_options["downsample"] == "merging_legacy"
    again = build_network("swinunetr", "med_adapter", **model.network_options)
    again.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(again.eval()(x), model.eval()(x), atol=1e-5)


def test_monai_self_supervised_weights_load_as_monai_loads_them(tmp_path):
    """MONAI's SSL Swin ViT release ("W1", model_swinvit.pt) lands where MONAI's own SwinUNETR.load_from puts it."""
    from monai.networks.nets import SwinUNETR

    from medtuning.networks.models import SwinUNETRNet

    torch.manual_seed(0)
    source = SwinUNETR(in_channels=1, out_channels=2, feature_size=12)
    # the release's layout: {'state_dict': {'module.<swinViT key with mlp.fc1/fc2>'}}, plus the SSL heads
    state = {"module." + k.replace("mlp.linear", "mlp.fc"): v.clone() for k, v in source.swinViT.state_dict().items()}
    state["module.rotation_head.weight"] = torch.zeros(4, 768)
    torch.save({"epoch": 100, "state_dict": state}, tmp_path / "model_swinvit.pt")
    reference = SwinUNETR(in_channels=1, out_channels=2, feature_size=12)
    reference.load_from(torch.load(tmp_path / "model_swinvit.pt", weights_only=True))
    ours = SwinUNETRNet(in_channels=1, num_classes=2, img_size=64, feature_size=12)
    report = ours.load_pretrained(tmp_path / "model_swinvit.pt")
    assert report.layout == "monai-swinvit-ssl"
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        for a, b in zip(reference.eval().swinViT(x), ours.eval().swinViT(x)):
            assert (a - b).abs().max() < TOL


# --- through the bundles ----------------------------------------------------------------------------------------

PRETRAINED_RUNS = {  # bundle, file, network options besides what the file sets
    "dinov2_reg": ("medtuning_brats", "dinov2_reg.pth", {"num_heads": 2, "out_indices": [0, 1, 2]}),
    "sam": ("medtuning_brats", "sam_vit.pth", {"out_indices": [0, 1, 2, 3]}),
    "universal": ("medtuning_msd", "universal_swin_unetr.pth",
                  {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}),
}


@pytest.mark.slow
@pytest.mark.parametrize("run", sorted(PRETRAINED_RUNS))
def test_bundle_trains_from_a_release_and_serves_without_it(tmp_path, run):
    """--pretrained FILE: the bundle builds what the file needs, records it in network.json, and inference rebuilds
    the trained network from there with no pretrained file."""
    from medtuning.bundles.common import prepare_demo

    from .test_bundles import BUNDLES, demo_override, run_workflow

    bundle, name, options = PRETRAINED_RUNS[run]
    work = prepare_demo(BUNDLES[bundle]["kind"], tmp_path / "work")
    demo = demo_override(bundle, "demo.json")
    backbone = "swinunetr" if bundle == "medtuning_msd" else "vit_b16_upernet"
    override = dict(demo, dataset_dir=work, ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "eval"),
                    epochs=1, iterations_per_epoch=1, val_interval=1, batch_size=1, pretrained=str(FIXTURES / name),
                    network_options={backbone: {**options, **({"decoder_channels": 16} if backbone.startswith("vit")
                                                             else {})}})
    run_workflow(bundle, ["train.json"], override, tmp_path, "train")
    settings = json.loads((tmp_path / "models" / "network.json").read_text())
    if bundle == "medtuning_msd":
        assert settings["options"]["downsample"] == "merging_legacy"
    else:
        assert settings["options"]["family"] == RELEASES[name][0]
    assert settings["pretrained"]["file"] == name
    infer = {"dataset_dir": str(tmp_path / "work"), "ckpt_dir": str(tmp_path / "models"),
             "output_dir": str(tmp_path / "predictions"), "sw_overlap": 0.25, "tta": False}
    run_workflow(bundle, ["inference.json"], infer, tmp_path, "infer")
    assert list((tmp_path / "predictions").glob("*.nii.gz"))


def test_dinov2_chunked_block_layout_loads_the_same(tmp_path):
    """DINOv2 models built with block_chunks save blocks.<chunk>.<i>.*; they are the same blocks."""
    import re

    state = torch.load(FIXTURES / "dinov2.pth", weights_only=True)
    chunked = {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m.group(1)) // 2}.{m.group(1)}.", k): v
               for k, v in state.items()}
    assert "blocks.1.2.ls1.gamma" in chunked
    torch.save(chunked, tmp_path / "chunked.pth")
    backbone, report = backbone_from_checkpoint(tmp_path / "chunked.pth", num_heads=2)
    assert report.layout == "dinov2" and not report.missing and not report.unexpected
    ref, _ = reference("dinov2.pth")
    with torch.no_grad():
        assert (backbone.eval().block_outputs(ref["input_112"])[-1] - ref["block2_112"]).abs().max() < TOL


def test_a_float16_release_is_resized_in_float32(tmp_path):
    """OpenAI publishes CLIP in float16: the position embedding is resized from those values in float32, not
    rounded to float16 again after resizing."""
    from medtuning.networks.backbones.pos_embed import resize_pos_embed

    state = torch.load(FIXTURES / "clip_openclip.bin", weights_only=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "half.bin")
    backbone, _ = backbone_from_checkpoint(tmp_path / "half.bin", num_heads=2, img_size=128)
    source = state["visual.positional_embedding"].half().float()[None]
    expected = resize_pos_embed(source, (8, 8), (4, 4), 1, "bicubic_antialias")
    assert backbone.pos_embed.dtype == torch.float32 and torch.equal(backbone.pos_embed.detach(), expected)
