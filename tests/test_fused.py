"""The chunked full-resolution head of Swin-Unet against the same head written with whole tensors."""

import pytest
import torch
import torch.nn.functional as F

import medtuning.networks.efficiency.fused_head as fused
from medtuning.networks.efficiency.fused_head import expand_norm_classify


def reference_expand_norm_classify(x: torch.Tensor, expand_weight: torch.Tensor, norm_weight: torch.Tensor,
                                   norm_bias: torch.Tensor, classifier_weight: torch.Tensor, scale: int,
                                   eps: float = 1e-5) -> torch.Tensor:
    """The same head written with whole-tensor operations, as the decoder computed it before."""
    b, h, w, c = x.shape
    z = F.layer_norm(F.linear(x, expand_weight).view(b, h, w, scale, scale, c), (c,), norm_weight, norm_bias, eps)
    logits = F.linear(z, classifier_weight.flatten(1))
    return logits.permute(0, 5, 1, 3, 2, 4).reshape(b, -1, h * scale, w * scale)


def _head(dtype=torch.float64, b=2, h=5, c=8, k=3, scale=4):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(b, h, h + 1, c, generator=g, dtype=dtype), torch.randn(scale * scale * c, c, generator=g, dtype=dtype),
               1 + 0.1 * torch.randn(c, generator=g, dtype=dtype), 0.1 * torch.randn(c, generator=g, dtype=dtype),
               torch.randn(k, c, 1, 1, generator=g, dtype=dtype)]
    return [t.requires_grad_() for t in tensors]


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 1000])  # chunks of one token, uneven chunks, one chunk
def test_chunked_head_matches_whole_tensor_head(monkeypatch, rows_per_chunk):
    monkeypatch.setitem(fused.CHUNK_ELEMENTS, "cpu", rows_per_chunk * 16 * 8)
    params = _head()
    grad_out = torch.randn(2, 3, 20, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for head in (expand_norm_classify, reference_expand_norm_classify):
        out = head(*params, 4)
        results.append((out, torch.autograd.grad(out, params, grad_out)))
    (out, grads), (ref_out, ref_grads) = results
    assert out.shape == (2, 3, 20, 24)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for name, grad, ref in zip(("input", "expand", "norm weight", "norm bias", "classifier"), grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-10, msg=f"gradient of the {name}")


def test_chunked_head_passes_gradcheck(monkeypatch):
    monkeypatch.setitem(fused.CHUNK_ELEMENTS, "cpu", 3 * 4 * 4)
    params = _head(b=1, h=2, c=4, k=2, scale=2)
    assert torch.autograd.gradcheck(lambda *p: expand_norm_classify(*p, 2), params)


def test_chunked_head_under_autocast_normalises_in_float32():
    params = [p.detach().float().requires_grad_() for p in _head(c=16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = expand_norm_classify(*params, 4)
        ref = reference_expand_norm_classify(*params, 4)
    assert out.dtype == torch.float32  # the classifier runs in float32 like the LayerNorm before it
    torch.testing.assert_close(out, ref.float(), rtol=0.05, atol=0.05)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in params)


def test_chunked_head_rejects_a_mismatched_expansion():
    x, expand, *rest = _head()
    with pytest.raises(ValueError, match="does not expand 8 channels x2"):
        expand_norm_classify(x, expand, *rest, 2)
