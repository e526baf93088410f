"""Local weight files: formats, reports, and clear errors for files that cannot be used."""

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from medtuning.networks.backbones.layers import resize_rel_pos_bias_table
from medtuning.networks.models import SwinUNETRNet, SwinUNet
from medtuning.networks.backbones.swin import SwinTransformer
from medtuning.networks.backbones.vit import VisionTransformer
from medtuning.networks.weights import WeightLoadError, load_backbone_weights

from .conftest import shared_path


def small_vit(**kw):
    return VisionTransformer(**{"img_size": 32, "patch_size": 16, "embed_dim": 48, "depth": 2, "num_heads": 3, **kw}).eval()


def to_google_npz(model: VisionTransformer, path):
    """Write a timm-named ViT in the Google/Flax ``.npz`` layout (the inverse of the loader)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    heads, c = model.blocks[0].attn.num_heads, model.embed_dim
    hd = c // heads
    out = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
           "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
           "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
           "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"]}
    for i in range(len(model.blocks)):
        b, bp = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mp = bp + "MultiHeadDotProductAttention_1/"
        out[bp + "LayerNorm_0/scale"], out[bp + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        out[bp + "LayerNorm_2/scale"], out[bp + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"].reshape(3, c, c), sd[b + "attn.qkv.bias"].reshape(3, heads, hd)
        for j, n in enumerate(("query", "key", "value")):
            out[f"{mp}{n}/kernel"] = qkv_w[j].T.reshape(c, heads, hd)
            out[f"{mp}{n}/bias"] = qkv_b[j]
        out[mp + "out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, hd, c)
        out[mp + "out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            out[f"{bp}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{b}mlp.fc{r + 1}.weight"].T
            out[f"{bp}MlpBlock_3/Dense_{r}/bias"] = sd[f"{b}mlp.fc{r + 1}.bias"]
    np.savez(path, **out)


def test_google_npz_loads_into_timm_names(tmp_path):
    torch.manual_seed(0)
    src = small_vit()
    to_google_npz(src, tmp_path / "vit.npz")
    dst = small_vit()
    report = load_backbone_weights(dst, tmp_path / "vit.npz")
    assert report.layout == "google-npz" and not report.missing
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(src(x), dst(x), atol=1e-5)


def test_safetensors_with_module_prefix_and_container(tmp_path):
    torch.manual_seed(0)
    src = small_vit()
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    report = load_backbone_weights(small_vit(), tmp_path / "w.pth")
    assert report.ignored == ["epoch"] and len(report.loaded) == len(src.state_dict())


def test_missing_file(tmp_path):
    with pytest.raises(WeightLoadError, match="nope.safetensors: no such weight file"):
        load_backbone_weights(small_vit(), tmp_path / "nope.safetensors")


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in small_vit().state_dict().items()}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(WeightLoadError, match=r"w\.safetensors: not a readable safetensors file"):
        load_backbone_weights(small_vit(), path)


def test_truncated_pth(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(small_vit().state_dict(), path)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(WeightLoadError, match=r"w\.pth: not a readable PyTorch checkpoint"):
        load_backbone_weights(small_vit(), path)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_holding_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(1)}, "extra": Payload()}, f)
    with pytest.raises(WeightLoadError, match="holds Python objects other than tensors"):
        load_backbone_weights(small_vit(), path)


def test_other_architecture_is_refused(tmp_path):
    with pytest.raises(WeightLoadError, match="does not look like a ViT checkpoint"):
        load_backbone_weights(small_vit(), shared_path("fixtures", "timm_parity", "swin_tiny_timm.safetensors"))
    with pytest.raises(WeightLoadError, match="shapes do not match this ViT"):
        load_backbone_weights(small_vit(embed_dim=96), _save(tmp_path, small_vit(embed_dim=48)))


def _save(tmp_path, model):
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def test_unsupported_suffix(tmp_path):
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(WeightLoadError, match="unsupported weight file type '.h5'"):
        load_backbone_weights(small_vit(), tmp_path / "w.h5")


def test_swin_window_change_resizes_bias_tables():
    model = SwinTransformer(img_size=128, patch_size=4, embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                            window_size=4)
    report = load_backbone_weights(model, shared_path("fixtures", "timm_parity", "swin_tiny_official.pth"))
    tables = [k for k in report.resized if k.endswith("relative_position_bias_table")]
    assert len(tables) == 8 and "(169, 1) -> (49, 1)" in report.resized[tables[0]]
    assert model.layers[0].blocks[0].attn.relative_position_bias_table.shape == (49, 1)


def test_rel_pos_table_resize_keeps_centre_and_is_identity_at_same_size():
    table = torch.randn(13 * 13, 2)
    assert resize_rel_pos_bias_table(table, (7, 7)) is table
    small = resize_rel_pos_bias_table(table, (4, 4))
    assert small.shape == (49, 2)
    assert torch.allclose(small.view(7, 7, 2)[3, 3], table.view(13, 13, 2)[6, 6])
    big = resize_rel_pos_bias_table(table, (10, 10))
    assert big.shape == (19 * 19, 2)
    assert torch.allclose(big.view(19, 19, 2)[9, 9], table.view(13, 13, 2)[6, 6])


def test_swin_unet_loads_microsoft_checkpoint_and_mirrors_decoder():
    net = SwinUNet(in_channels=4, num_classes=3, img_size=224, num_slices=2, embed_dim=24, num_heads=(1, 2, 4, 8),
                   window_size=7)
    report = net.load_pretrained(shared_path("fixtures", "timm_parity", "swin_tiny_official.pth"))
    assert "patch_embed.proj.weight" in report.resized  # 3 -> 4 input channels
    assert torch.equal(net.decoder.layers_up[1].blocks[0].attn.qkv.weight, net.backbone.layers[2].blocks[0].attn.qkv.weight)


def test_monai_self_supervised_swinvit_layout(tmp_path):
    torch.manual_seed(0)
    src = SwinUNETRNet(in_channels=1, num_classes=2, img_size=64, feature_size=12)
    state = {"module." + k.replace("mlp.linear", "mlp.fc"): v for k, v in src.swinViT.state_dict().items()}
    state["module.rotation_head.weight"] = torch.zeros(4, 3)
    torch.save({"epoch": 100, "state_dict": state}, tmp_path / "model_swinvit.pt")
    torch.manual_seed(1)
    dst = SwinUNETRNet(in_channels=1, num_classes=2, img_size=64, feature_size=12)
    report = dst.load_pretrained(tmp_path / "model_swinvit.pt")
    assert report.layout == "monai-swinvit-ssl" and "rotation_head.weight" in report.unexpected
    for (k, a), b in zip(src.swinViT.state_dict().items(), dst.swinViT.state_dict().values()):
        assert torch.equal(a, b), k
