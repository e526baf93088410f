"""Tuned-only checkpoints: save what was tuned, apply it over a separately loaded backbone."""

import pytest
import torch

from medtuning.networks import build_network
from medtuning.networks.checkpoint import load_tuned, save_tuned, tuned_state_dict
from medtuning.networks.weights import WeightLoadError

from .conftest import TINY_SWIN, TINY_VIT


def trained(name, options, method="med_adapter", seed=0):
    torch.manual_seed(seed)
    net = build_network(name, method, **options).train()
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return net


@pytest.mark.parametrize("name,options,shape", [("vit_b16_upernet", TINY_VIT, (1, 4, 8, 32, 32)),
                                                ("swin_unet", TINY_SWIN, (1, 4, 8, 64, 64))])
def test_round_trip_over_a_separately_loaded_backbone(tmp_path, name, options, shape):
    net = trained(name, options)
    net(torch.randn(*shape))  # BatchNorm statistics move; they must travel with the tuned state
    sizes = save_tuned(net, tmp_path / "tuned.safetensors")
    assert sizes["tuned_file_bytes"] == (tmp_path / "tuned.safetensors").stat().st_size
    # a network given only the frozen parts (what a pretrained file provides), every tuned value different
    fresh = trained(name, options, seed=1)
    frozen = tuple(f"{prefix}." for prefix in net.pet.frozen)
    fresh.load_state_dict({k: v for k, v in net.state_dict().items() if k.startswith(frozen)}, strict=False)
    tuned_backbone = [k for k in tuned_state_dict(net) if k.startswith("backbone.")]
    assert tuned_backbone, "the backbone's tuned parts (position embedding, final norm) must travel too"
    assert all(not torch.equal(fresh.state_dict()[k], net.state_dict()[k]) for k in tuned_backbone
               if net.state_dict()[k].is_floating_point())
    meta = load_tuned(fresh, tmp_path / "tuned.safetensors")
    assert meta["method"] == "med_adapter" and meta["config"]["reduction"] == 6
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), fresh.eval()(x))
    assert not any(k.startswith("backbone.blocks") or k.startswith("backbone.layers") for k in tuned_state_dict(net))
    assert list(tmp_path.iterdir()) == [tmp_path / "tuned.safetensors"], "no temporary file left behind"


def test_tuned_file_is_a_fraction_of_the_full_network(tmp_path):
    # against a float32 full state, what full fine-tuning saves
    options = dict(TINY_VIT, embed_dim=384, depth=8, num_heads=6, out_indices=(1, 3, 5, 7), frozen_precision="float32")
    sizes = save_tuned(trained("vit_b16_upernet", options), tmp_path / "t.safetensors")
    assert sizes["tuned_file_bytes"] < 0.2 * sizes["full_state_bytes"]


def test_wrong_method_or_network_is_refused(tmp_path):
    save_tuned(trained("vit_b16_upernet", TINY_VIT), tmp_path / "t.safetensors")
    with pytest.raises(WeightLoadError, match="saved for method 'med_adapter', the model uses 'head'"):
        load_tuned(build_network("vit_b16_upernet", "head", **TINY_VIT), tmp_path / "t.safetensors")
    with pytest.raises(WeightLoadError, match="does not fit this network"):
        load_tuned(build_network("vit_b16_upernet", "med_adapter", **dict(TINY_VIT, decoder_channels=16)),
                   tmp_path / "t.safetensors")


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tuned(trained("vit_b16_upernet", TINY_VIT), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(WeightLoadError, match="not a readable safetensors checkpoint"):
        load_tuned(trained("vit_b16_upernet", TINY_VIT), path)
