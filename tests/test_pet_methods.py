"""The PET baselines behind the shared interface: what is tuned, that the backbone stays untouched, identity
at start where a method promises it, LoRA merging, and the paper's parameter counts (Tables 1-3)."""

from __future__ import annotations

import json

import pytest
import torch

from medtuning.networks import build_network
from medtuning.networks.pet import get_method, merge_lora, unmerge_lora
from medtuning.networks.pet.layers import depthwise_conv3d
from medtuning.networks.tools.summary import build_for_summary, parameter_summary

from .conftest import (TINY_SWIN, TINY_SWINUNETR, TINY_VIT, assert_gradients_close, assert_same_function,
                       shared_path, tuned_gradients)

BASELINES = ["adapter", "adaptformer", "dvpt", "lora", "pro_tuning", "ssf", "st_adapter", "vpt_deep", "vpt_shallow"]
SLICE_ONLY = {"st_adapter", "pro_tuning"}  # need a 2D backbone read slice by slice
PROMPTS = {"vpt_shallow", "vpt_deep"}  # 2D backbones only
NETWORKS = {"vit_b16_upernet": (TINY_VIT, (1, 4, 8, 32, 32)), "swin_unet": (TINY_SWIN, (1, 4, 8, 64, 64)),
            "swinunetr": (TINY_SWINUNETR, (1, 1, 32, 64, 64))}
# methods whose fresh model computes exactly what the frozen backbone computes
IDENTITY_AT_START = ["adapter", "adaptformer", "dvpt", "lora", "pro_tuning", "ssf", "st_adapter"]
CASES = [(m, n) for m in BASELINES for n in NETWORKS
         if not (n == "swinunetr" and m in SLICE_ONLY | PROMPTS)]


def build(name, method, seed=0, frozen_precision="auto", **method_options):
    torch.manual_seed(seed)
    options, shape = NETWORKS[name]
    return build_network(name, method, method_options=method_options or None, frozen_precision=frozen_precision,
                         **options), shape


@pytest.mark.parametrize("method,name", CASES)
def test_only_the_method_is_tuned_and_the_backbone_stays_bit_identical(method, name):
    net, shape = build(name, method)
    net.train()
    inserted = {n for n, _ in net.named_parameters() if any(n.startswith(f"{p}.") for p in net.pet.inserted)}
    assert inserted, f"{method} inserted nothing"
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen and not inserted & set(frozen)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # two steps: zero-initialised up-projections pass gradient on only after the first
        optimizer.zero_grad()
        net(torch.randn(*shape)).square().mean().backward()
        optimizer.step()
    for n, p in net.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n
    grads = {n: p.grad for n, p in net.named_parameters() if n in inserted}
    assert all(g is not None for g in grads.values())
    assert any(bool(g.abs().sum() > 0) for g in grads.values())


@pytest.mark.parametrize("method,name", CASES)
def test_recomputed_frozen_blocks_give_the_same_gradients(method, name):
    # frozen blocks run again in the backward pass (the default) with the method's modules hooked inside
    # them: the recomputation must see what the forward saw (VPT on Swin cannot, and is not recomputed)
    grads = {}
    for activations in ("float32", "recompute"):
        torch.manual_seed(0)
        options, shape = NETWORKS[name]
        net = build_network(name, method, frozen_activations=activations, frozen_precision="float32", **options)
        torch.manual_seed(1)
        net.train()(torch.randn(*shape)).square().mean().backward()
        grads[activations] = tuned_gradients(net)
    assert_gradients_close(grads["recompute"], grads["float32"], rtol=1e-5)


@pytest.mark.parametrize("method,name", [c for c in CASES if c[0] in IDENTITY_AT_START])
def test_fresh_model_computes_the_backbone(method, name):
    # the frozen backbone in the precision the method keeps it in (LoRA: float32, it merges into it)
    reference, shape = build(name, "head", frozen_precision="auto" if get_method(method).bfloat16_frozen_blocks
                             else "float32")
    net, _ = build(name, method)
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), reference.eval()(x))


@pytest.mark.parametrize("name", ["vit_b16_upernet", "swin_unet", "swinunetr"])
def test_lora_merged_equals_unmerged(name):
    net, shape = build(name, "lora", rank=4, alpha=8.0)
    with torch.no_grad():
        for p in net.lora.parameters():
            p.normal_(0, 0.05)
    net.eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        unmerged = net(x)
        qkv_before = [p.clone() for n, p in net.named_parameters() if n.endswith("qkv.weight")]
        merged = merge_lora(net)(x)
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
        merge_lora(net)  # idempotent
        torch.testing.assert_close(net(x), unmerged, atol=1e-5, rtol=1e-5)
        unmerge_lora(net)
        torch.testing.assert_close(net(x), unmerged, atol=1e-5, rtol=1e-5)
        after = [p for n, p in net.named_parameters() if n.endswith("qkv.weight")]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(after, qkv_before))


PAPER_ROWS = {"adapter": "Adapter", "adaptformer": "AdaptFormer", "st_adapter": "ST-Adapter",
              "pro_tuning": "Pro-tuning", "vpt_shallow": "VPT-Shallow", "vpt_deep": "VPT-Deep"}


@pytest.mark.parametrize("name", ["vit_b16_upernet", "swin_unet"])
@pytest.mark.parametrize("method", sorted(PAPER_ROWS))
def test_paper_counts(name, method):
    reference = json.loads(shared_path("reference", "paper_parameter_counts.json").read_text())[name]
    row = reference["paper_table_M"][PAPER_ROWS[method]]
    summary = parameter_summary(build_for_summary(name, method, in_channels=4, num_classes=4, img_size=128))
    head = reference["head_exact"]
    assert round(summary["inserted"] / 1e6, 3) == row["inserted"]
    assert summary["tuned"] == head + summary["inserted"]
    # the reference's rounding note: one row adds the rounded inserted figure to the rounded head figure
    assert row["tuned"] in (round(summary["tuned"] / 1e6, 3), round(round(head / 1e6, 3) + row["inserted"], 3))


@pytest.mark.parametrize("share_every,expected_modules", [(1, 4), (2, 2), (4, 1)])
def test_dvpt_sharing_and_count(share_every, expected_modules):
    net, _ = build("vit_b16_upernet", "dvpt", bottleneck=8, num_prompts=5, share_every=share_every)
    assert len(net.dvpt) == expected_modules
    c, r, m = TINY_VIT["embed_dim"], 8, 5
    assert parameter_summary(net)["inserted"] == expected_modules * (2 * c * r + r + c + m * r)
    swin, _ = build("swin_unet", "dvpt", share_every=2)  # never shared across stages of different width
    assert len(swin.dvpt) == len(swin.backbone.layers)


@pytest.mark.parametrize("kernel, padding", [((1, 5, 5), (0, 2, 2)), ((3, 1, 1), (1, 0, 0)), ((2, 1, 1), (1, 0, 0)),
                                             ((1, 3, 3), (0, 0, 0)), ((3, 3, 3), (1, 1, 1))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_depthwise_conv3d_equals_the_3d_convolution(kernel, padding, channels_last):
    # the 2D paths (in-plane, across slices, also with an output size other than the input's) and the
    # fallback give conv(x), values and gradients
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(6, 6, kernel, padding=padding, groups=6)
    volume = torch.randn(2, 7, 5, 9, 6).permute(0, 4, 1, 2, 3)  # (B, C, D, h, w), channels-last like tokens
    volume = volume if channels_last else volume.contiguous()
    params = list(conv.parameters())
    assert_same_function(lambda v: depthwise_conv3d(v, conv), conv, volume, params, params)


def _randomised(net: torch.nn.Module) -> torch.nn.Module:
    """Tuned parameters away from their identity-at-start values, so every term of a formula shows."""
    torch.manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return net.eval()


def test_lora_adds_scaled_low_rank_updates_to_query_and_value_only():
    # the published formula, written out here: qkv(x) + (alpha / rank) * [B_q A_q x, 0, B_v A_v x]
    rank, alpha = 4, 16.0
    net = _randomised(build_network("vit_b16_upernet", "lora", method_options={"rank": rank, "alpha": alpha},
                                    frozen_precision="float32", **TINY_VIT))
    qkv, lora = net.backbone.blocks[1].attn.qkv, net.lora[1]
    x = torch.randn(2, 17, TINY_VIT["embed_dim"])
    low_rank = {part: x @ getattr(lora, f"a_{part}").weight.T @ getattr(lora, f"b_{part}").weight.T for part in "qv"}
    expected = torch.nn.functional.linear(x, qkv.weight, qkv.bias) + torch.cat(
        [low_rank["q"], torch.zeros_like(low_rank["q"]), low_rank["v"]], dim=-1) * (alpha / rank)
    with torch.no_grad():
        torch.testing.assert_close(qkv(x), expected, rtol=1e-5, atol=1e-5)


def test_adaptformer_adds_a_scaled_relu_bottleneck_of_the_residual_stream_to_the_mlp():
    # AdaptFormer (Chen et al. 2022), eq. 2-3: x' = x + attn(norm1(x)); out = x' + mlp(norm2(x')) + s * up(relu(down(x')))
    net = _randomised(build_network("vit_b16_upernet", "adaptformer", frozen_precision="float32", **TINY_VIT))
    block, branch = net.backbone.blocks[2], net.adaptformer[2]
    x = torch.randn(2, 17, TINY_VIT["embed_dim"])
    with torch.no_grad():
        # the frozen sub-layers called without their hooks: .forward, not __call__
        mid = x + block.attn.forward(block.norm1.forward(x))
        expected = mid + block.mlp.forward(block.norm2.forward(mid)) + 0.1 * branch.up(torch.relu(branch.down(mid)))
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["vpt_shallow", "vpt_deep"])
def test_vpt_on_vit_is_the_published_prompt_data_flow(method):
    """VPT (Jia et al. 2022) written out over the frozen backbone's own layers: prompts after the class token (none
    here, the paper's setting) and the position-embedded patches; shallow carries them through every block, deep
    replaces them with each block's own before it. The blocks' patch-token outputs must be the network's."""
    torch.manual_seed(0)
    net = _randomised(build_network("vit_b16_upernet", method, frozen_precision="float32", **TINY_VIT))
    vit, prompts = net.backbone, net.vpt
    slices = torch.randn(8, 4, 32, 32)  # one volume of 8 slices
    with torch.no_grad():
        net.context.begin(8)
        ours = vit.forward_intermediates(slices, list(range(len(vit.blocks))))
        tokens = vit.patch_embed.proj(slices).flatten(2).transpose(1, 2) + vit.pos_embed
        prefix = vit.num_prefix_tokens
        assert prefix == 0 and len(prompts) == (len(vit.blocks) if method == "vpt_deep" else 1)
        n = prompts[0].shape[1]
        x = torch.cat([prompts[0].expand(8, -1, -1), tokens], dim=1)
        for i, block in enumerate(vit.blocks):
            if method == "vpt_deep":
                x = torch.cat([prompts[i].expand(8, -1, -1), x[:, n:]], dim=1)
            x = block.forward(x)  # the block without its hooks
            expected = x[:, n:].transpose(1, 2).reshape(8, -1, *vit.grid_size)
            torch.testing.assert_close(ours[i], expected, rtol=1e-5, atol=1e-5)


def test_lora_equals_hugging_face_peft():
    """peft's own LoRA (rank 4, alpha 16) on separate q and v layers, saved by tests/fixtures/make_peft_lora.py: the
    same weights in a block's fused qkv layer and its LoRA module give peft's output."""
    from safetensors.torch import load_file

    from .conftest import REPO

    reference = load_file(REPO / "tests" / "fixtures" / "peft_lora.safetensors")
    net = build_network("vit_b16_upernet", "lora", method_options={"rank": 4, "alpha": 16.0}, frozen_precision="float32",
                        **TINY_VIT).eval()
    qkv, lora = net.backbone.blocks[0].attn.qkv, net.lora[0]
    with torch.no_grad():
        qkv.weight.copy_(reference["qkv.weight"])
        qkv.bias.copy_(reference["qkv.bias"])
        for name in ("a_q", "b_q", "a_v", "b_v"):
            getattr(lora, name).weight.copy_(reference[name])
        torch.testing.assert_close(qkv(reference["input"]), reference["output"], rtol=1e-5, atol=1e-5)
        merge_lora(net)  # and folded into the weights for inference
        torch.testing.assert_close(qkv(reference["input"]), reference["output"], rtol=1e-5, atol=1e-5)


def test_dvpt_prompts_gather_from_the_tokens_and_the_tokens_read_them_back():
    """DVPT's paper (He et al. 2023, sec. 3): z = GELU(down(x)); the prompts P query z, giving sample-specific
    prompts D = softmax(P z^T / sqrt(r)) z; each token reads them, softmax(z D^T / sqrt(r)) D; x + up(that)."""
    net = _randomised(build_network("vit_b16_upernet", "dvpt", frozen_precision="float32", **TINY_VIT))
    block, module = net.backbone.blocks[1], net.dvpt[1]
    x = torch.randn(8, 4, TINY_VIT["embed_dim"])
    with torch.no_grad():
        net.context.begin(8)
        frozen = block.forward(x)  # the block without the hook that adds DVPT
        z = torch.nn.functional.gelu(module.down(frozen))
        r = z.shape[-1]
        prompts = module.prompts.expand(8, -1, -1)
        dynamic = torch.softmax(prompts @ z.transpose(1, 2) / r ** 0.5, dim=-1) @ z
        read = torch.softmax(z @ dynamic.transpose(1, 2) / r ** 0.5, dim=-1) @ dynamic
        torch.testing.assert_close(block(x), frozen + module.up(read), rtol=1e-5, atol=1e-5)
