"""Med-Adapter: the reference computation, PET freezing, autocast, depth errors, memory option."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medtuning.networks import build_network
from medtuning.networks.pet.med_adapter import DepthwiseBranch, FrequencyFilter, MedAdapter

from .conftest import (TINY_SWIN, TINY_SWINUNETR, TINY_VIT, assert_gradients_close, assert_same_function, forward_counting_saved,
                       forward_keeping_saved, tuned_gradients)


def reference_fft_branch(x, weight, bias):
    """The reference code's global branch, literally: 3D FFT, weight and bias per depth frequency."""
    spec = torch.fft.fftn(x, dim=(2, 3, 4))
    spec = spec * weight.view(1, 1, -1, 1, 1) + bias.view(1, 1, -1, 1, 1)
    return torch.abs(torch.fft.ifftn(spec, dim=(2, 3, 4)))


def test_fft_branch_equals_direct_3d_fft():
    torch.manual_seed(0)
    filt = FrequencyFilter(depth=12)
    with torch.no_grad():
        filt.weight.normal_()
        filt.bias.normal_()
    x = torch.randn(2, 5, 12, 6, 7)
    assert torch.allclose(filt(x), reference_fft_branch(x, filt.weight, filt.bias), atol=1e-5)


def test_fft_branch_rejects_another_depth():
    with pytest.raises(ValueError, match="built for 12 slices.*has 10"):
        FrequencyFilter(depth=12)(torch.randn(1, 2, 10, 4, 4))


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_depthwise_branch_equals_its_3d_convolutions(kernel, channels_last):
    # runs its Conv3d modules as 2D convolutions: same outputs and gradients as running them as 3D ones
    torch.manual_seed(0)
    branch = DepthwiseBranch(6, kernel)
    for p in branch.parameters():
        p.data.normal_()
    volume = torch.randn(2, 7, 5, 9, 6).permute(0, 4, 1, 2, 3)  # (B, C, D, h, w), channels-last like tokens
    volume = volume if channels_last else volume.contiguous()
    reference = nn.Sequential(*copy.deepcopy(list(branch)))
    assert_same_function(branch, reference, volume, list(branch.parameters()), list(reference.parameters()))


def reference_adapter(adapter: MedAdapter, tokens, batch, depth, grid, prev):
    """Med-Tuning's MedAdapter.forward re-written from the paper/reference for ViT tokens."""
    x = F.gelu(adapter.down_projection(tokens))
    b_, length, c = x.shape
    v = x.reshape(batch, depth, grid[0], grid[1], c).permute(0, 4, 1, 2, 3)
    local = sum(nn.Sequential(*branch)(v) for branch in adapter.branches)  # literal 3D convolutions
    local = local + reference_fft_branch(v, adapter.global_filter.weight, adapter.global_filter.bias)
    local = adapter.mix(local)
    if adapter.inter_stage:
        if prev is None:
            prev = torch.zeros_like(local)
        local = adapter.fuse(torch.cat([local, adapter.align(prev)], dim=1))
    out = (v + local).permute(0, 2, 3, 4, 1).reshape(b_, length, c)
    return tokens + F.gelu(adapter.up_projection(out)), local


def test_vit_network_matches_reference_adapter_computation():
    torch.manual_seed(0)
    net = build_network("vit_b16_upernet", "med_adapter", frozen_activations="float32", frozen_precision="float32",
                        **TINY_VIT).eval()
    for p in net.med_adapter.parameters():  # move away from the ones/zeros initialisation
        p.data.normal_(0, 0.2)
    slices = torch.randn(2, 4, 8, 32, 32).transpose(1, 2).reshape(16, 4, 32, 32)
    with torch.no_grad():
        net.context.begin(depth=8)
        ours = net.backbone.forward_features(slices)  # blocks called through their adapter hooks
        # replay: Module.forward bypasses hooks, adapters applied the reference way
        tokens, prev = net.backbone.embed(slices), None
        for blk, adapter in zip(net.backbone.blocks, net.med_adapter):
            tokens, stage_map = reference_adapter(adapter, blk.forward(tokens), 2, 8, (2, 2), prev)
            prev = stage_map if adapter.inter_stage else prev
        reference = net.backbone.norm(tokens)
    assert torch.allclose(ours, reference, atol=1e-5)


def reference_swin_adapter(adapter: MedAdapter, tokens, batch, depth, prev):
    """The same for Swin's (B*D, h, w, C) tokens, with the reference's inter-stage alignment written out: the
    previous stage's (B, C'/2, D, 2h, 2w) map through a (1, 3, 3) convolution of stride (1, 2, 2), padding
    (0, 1, 1); the first stage aligns an all-zero map, which leaves the bias."""
    x = F.gelu(adapter.down_projection(tokens))
    bd, h, w, c = x.shape
    v = x.reshape(batch, depth, h, w, c).permute(0, 4, 1, 2, 3)
    local = sum(nn.Sequential(*branch)(v) for branch in adapter.branches)
    local = adapter.mix(local + reference_fft_branch(v, adapter.global_filter.weight, adapter.global_filter.bias))
    if adapter.inter_stage:
        if prev is None:
            aligned = adapter.align.bias.view(1, -1, 1, 1, 1).expand_as(local)
        else:
            aligned = F.conv3d(prev, adapter.align.weight, adapter.align.bias, stride=(1, 2, 2), padding=(0, 1, 1))
        local = adapter.fuse(torch.cat([local, aligned], dim=1))
    out = (v + local).permute(0, 2, 3, 4, 1).reshape(bd, h, w, c)
    return tokens + F.gelu(adapter.up_projection(out)), local


def test_swin_encoder_matches_reference_adapters_and_strided_alignment():
    torch.manual_seed(0)
    net = build_network("swin_unet", "med_adapter", frozen_activations="float32", frozen_precision="float32",
                        **dict(TINY_SWIN, drop_path_rate=0.0)).eval()
    for p in net.med_adapter.parameters():
        p.data.normal_(0, 0.2)
    slices = torch.randn(2, 4, 8, 64, 64).transpose(1, 2).reshape(16, 4, 64, 64)
    with torch.no_grad():
        net.context.begin(depth=8)
        ours = [x for _, x in net.backbone.forward_stages(slices)]  # adapters through their hooks
        tokens, prev, adapters, reference = net.backbone.embed(slices), None, iter(net.med_adapter), []
        for stage in net.backbone.layers:
            tokens = stage.downsample.forward(tokens)
            for blk in stage.blocks:
                adapter = next(adapters)
                tokens, stage_map = reference_swin_adapter(adapter, blk.forward(tokens), 2, 8, prev)
                prev = stage_map if adapter.inter_stage else prev
            reference.append(tokens)
    assert len(ours) == len(reference) == 4
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,options,shape", [
    ("vit_b16_upernet", TINY_VIT, (2, 4, 8, 32, 32)),
    ("swin_unet", TINY_SWIN, (1, 4, 8, 64, 64)),
    ("swinunetr", TINY_SWINUNETR, (1, 1, 64, 64, 64)),
])
def test_only_tuned_parameters_change_after_a_step(name, options, shape):
    torch.manual_seed(0)
    net = build_network(name, "med_adapter", **options).train()
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    tuned = {n for n, p in net.named_parameters() if p.requires_grad}
    frozen_prefixes = tuple(f"{p}." for p in net.pet.frozen)
    assert all(not n.startswith(frozen_prefixes) for n in tuned)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    out = net(torch.randn(*shape))
    assert out.shape[0] == shape[0] and out.shape[2:] == shape[2:]
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad), "every tuned parameter is used"
    assert all(p.grad is None for p in net.parameters() if not p.requires_grad)
    opt.step()
    after = net.state_dict()
    for key, value in before.items():
        if key.startswith(frozen_prefixes):
            assert torch.equal(value, after[key]), f"frozen {key} changed"
    changed = [k for k in tuned if not torch.equal(before[k], after[k])]
    assert len(changed) > 0.9 * len(tuned)
    assert any(k.startswith("med_adapter.") for k in changed)


def test_autocast_bf16_outputs_finite_and_fft_in_float32():
    torch.manual_seed(0)
    net = build_network("swin_unet", "med_adapter", **TINY_SWIN).train()
    dtypes = []
    for m in net.modules():
        if isinstance(m, FrequencyFilter):
            m.register_forward_hook(lambda mod, args, out: dtypes.append((args[0].dtype, out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(1, 4, 8, 64, 64))
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)
    assert dtypes and all(out_dtype == torch.float32 for _, out_dtype in dtypes)
    assert any(in_dtype == torch.bfloat16 for in_dtype, _ in dtypes), "autocast reached the adapters"


def test_volume_depth_the_adapters_cannot_take_is_a_clear_error():
    net = build_network("vit_b16_upernet", "med_adapter", **TINY_VIT)
    with pytest.raises(ValueError, match="built for 8 slices"):
        net(torch.randn(1, 4, 6, 32, 32))
    with pytest.raises(ValueError, match=r"expected a volume batch \[B, C, D, H, W\]"):
        net(torch.randn(4, 32, 32))


@pytest.mark.parametrize("name,options,shape", [("vit_b16_upernet", TINY_VIT, (2, 4, 8, 32, 32)),
                                                ("swin_unet", dict(TINY_SWIN, drop_path_rate=0.3), (1, 4, 8, 64, 64)),
                                                ("swinunetr", TINY_SWINUNETR, (1, 1, 64, 64, 64))])
def test_frozen_activations_recomputed_or_narrowed_keep_gradients(name, options, shape):
    grads, saved = {}, {}
    for activations in ("float32", "recompute", "bfloat16"):
        torch.manual_seed(0)
        net = build_network(name, "med_adapter", frozen_activations=activations, frozen_precision="float32",
                            **options).train()
        torch.manual_seed(1)  # same drop-path draws; recomputation must replay them
        out, saved[activations] = forward_counting_saved(net, torch.randn(*shape))
        out.square().mean().backward()
        grads[activations] = tuned_gradients(net)
    # recomputation gives the very same gradients; bfloat16 storage gives close ones
    assert_gradients_close(grads["recompute"], grads["float32"], rtol=1e-5)
    assert ((grads["float32"] - grads["bfloat16"]).norm() / grads["float32"].norm()) < 1e-2
    assert saved["recompute"] < saved["float32"]  # what the outer hook sees: the blocks' own tensors are gone
    with pytest.raises(ValueError, match="unknown frozen_activations 'fp8'"):
        build_network(name, "med_adapter", frozen_activations="fp8", **options)


def test_recomputed_swinunetr_blocks_build_their_attention_mask_again():
    """The stage's shifted-window mask ([windows, 343, 343]) is not kept for the backward pass; the
    gradient test above checks that the rebuilt one is the same."""
    torch.manual_seed(0)
    net = build_network("swinunetr", "med_adapter", frozen_activations="recompute", **TINY_SWINUNETR).train()
    out, saved = forward_keeping_saved(net, torch.randn(1, 1, 64, 64, 64))
    shapes = [tuple(t.shape) for t in saved]
    assert (125, 343, 343) not in shapes and (27, 343, 343) not in shapes  # stages 1 and 2 at 64^3
    out.mean().backward()
    assert all(p.grad is not None for p in net.med_adapter.parameters())


@pytest.mark.parametrize("name,options,shape", [("vit_b16_upernet", TINY_VIT, (2, 4, 8, 32, 32)),
                                                ("swin_unet", TINY_SWIN, (1, 4, 8, 64, 64)),
                                                ("swinunetr", TINY_SWINUNETR, (1, 1, 64, 64, 64))])
def test_recomputed_adapters_give_the_same_gradients_and_batchnorm_statistics(name, options, shape):
    grads, statistics, saved = {}, {}, {}
    for recompute in (False, True):
        torch.manual_seed(0)
        net = build_network(name, "med_adapter", method_options={"recompute": recompute},
                            frozen_precision="float32", **options).train()
        torch.manual_seed(1)
        out, saved[recompute] = forward_counting_saved(net, torch.randn(*shape))
        out.square().mean().backward()
        grads[recompute] = tuned_gradients(net)
        # running statistics count the batch once, not once more for the recomputation
        statistics[recompute] = [b.clone() for b in net.med_adapter.buffers()]
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-7)
    assert statistics[True] and all(torch.equal(a, b) for a, b in zip(statistics[True], statistics[False]))
    assert saved[True] < saved[False]


@pytest.mark.parametrize("name,options,shape,chosen,other", [
    ("vit_b16_upernet", TINY_VIT, (1, 4, 8, 32, 32), "bfloat16", "recompute"),
    ("swin_unet", TINY_SWIN, (1, 4, 8, 64, 64), "recompute", "bfloat16")])
def test_auto_frozen_activations_are_the_networks_choice(name, options, shape, chosen, other):
    saved = {}
    for activations in ("auto", chosen, other):
        torch.manual_seed(0)
        net = build_network(name, "med_adapter", frozen_activations=activations, **options).train()
        _, saved[activations] = forward_counting_saved(net, torch.randn(*shape))
    assert saved["auto"] == saved[chosen] != saved[other]


def test_recomputed_adapters_use_the_geometry_of_their_own_forward():
    # two forwards on different in-plane sizes, one backward: each recomputation must rebuild its volume
    # with its own token grid and its own inter-stage map, not the last forward's
    grads = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        net = build_network("vit_b16_upernet", "med_adapter", method_options={"recompute": recompute},
                            frozen_precision="float32", **TINY_VIT).train()
        torch.manual_seed(1)
        small, large = torch.randn(1, 4, 8, 32, 32), torch.randn(1, 4, 8, 48, 48)
        (net(small).square().mean() + net(large).square().mean()).backward()
        grads[recompute] = tuned_gradients(net)
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-7)


def test_deepcopy_rebinds_adapters():
    torch.manual_seed(0)
    net = build_network("vit_b16_upernet", "med_adapter", **TINY_VIT).eval()
    twin = copy.deepcopy(net)
    with torch.no_grad():
        for p in twin.med_adapter.parameters():
            p.add_(0.5)
    x = torch.randn(1, 4, 8, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(net(x), twin(x))
        assert twin.med_adapter[0].context is twin.context


def test_applying_a_second_method_is_refused():
    from medtuning.networks import apply_method

    net = build_network("vit_b16_upernet", "head", **TINY_VIT)
    with pytest.raises(RuntimeError, match="already applied"):
        apply_method(net, "med_adapter")
    with pytest.raises(ValueError, match="unknown tuning method 'nope'"):
        build_network("vit_b16_upernet", "nope", **TINY_VIT)
    with pytest.raises(ValueError, match="has no option"):
        build_network("vit_b16_upernet", "med_adapter", method_options={"alpha": 3}, **TINY_VIT)
    with pytest.raises(ValueError, match="option 'recompute' of method 'med_adapter' must be True or False, got 'false'"):
        build_network("vit_b16_upernet", "med_adapter", method_options={"recompute": "false"}, **TINY_VIT)
    with pytest.raises(ValueError, match="option 'reduction' of method 'med_adapter' must be an integer, got 6.5"):
        build_network("vit_b16_upernet", "med_adapter", method_options={"reduction": 6.5}, **TINY_VIT)


@pytest.mark.parametrize("name,options,shape", [("vit_b16_upernet", TINY_VIT, (2, 4, 8, 32, 32)),
                                                ("swin_unet", TINY_SWIN, (1, 4, 8, 64, 64))])
def test_bfloat16_frozen_blocks_keep_float32_outputs_and_close_gradients(name, options, shape):
    grads = {}
    for precision in ("float32", "bfloat16"):
        torch.manual_seed(0)
        net = build_network(name, "med_adapter", frozen_precision=precision, **options).train()
        matrices = [m.weight.dtype for s in net.adapter_sites() for m in s.module.modules() if isinstance(m, nn.Linear)]
        norms = [m.weight.dtype for s in net.adapter_sites() for m in s.module.modules() if isinstance(m, nn.LayerNorm)]
        expected = torch.bfloat16 if precision == "bfloat16" else torch.float32
        assert set(matrices) == {expected} and set(norms) == {torch.float32}
        assert all(p.dtype == torch.float32 for p in net.parameters() if p.requires_grad)
        torch.manual_seed(1)
        out = net(torch.randn(*shape))
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        out.square().mean().backward()
        grads[precision] = tuned_gradients(net)
    assert ((grads["float32"] - grads["bfloat16"]).norm() / grads["float32"].norm()) < 5e-2


def test_lora_keeps_float32_frozen_blocks_and_bad_precision_is_refused():
    net = build_network("vit_b16_upernet", "lora", frozen_precision="bfloat16", **TINY_VIT)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    with pytest.raises(ValueError, match="unknown frozen_precision 'half'"):
        build_network("vit_b16_upernet", "med_adapter", frozen_precision="half", **TINY_VIT)


def test_cpu_bfloat16_attention_matches_the_fused_kernel():
    from medtuning.networks.backbones.layers import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 3, 16, 32) for _ in range(3))
    bias = torch.randn(6, 3, 16, 16)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    ours = attention(*(t.bfloat16() for t in (q, k, v)), bias.bfloat16())
    assert ours.dtype == torch.bfloat16
    assert torch.allclose(ours.float(), reference, atol=5e-2)
    assert torch.equal(attention(q, k, v, bias), reference)  # float32: the fused kernel itself
