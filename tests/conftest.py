"""Shared test helpers: where the shared fixtures live, small network configurations, what a training
step leaves behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# no process a test starts outlives it (Ctrl-C, failure, end of run)
from .processes import _no_process_outlives_its_test, pytest_configure, pytest_sessionfinish  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__import__("os").environ.get("MEDTUNING_SHARED", REPO.parent / "shared"))

# Small versions of the two 2D settings: same structure, fewer/narrower blocks, few slices.
TINY_VIT = dict(in_channels=4, num_classes=4, img_size=32, num_slices=8, embed_dim=96, depth=4, num_heads=3,
                out_indices=(0, 1, 2, 3), decoder_channels=32)
TINY_SWIN = dict(in_channels=4, num_classes=3, img_size=64, num_slices=8, embed_dim=24, num_heads=(1, 2, 4, 8))
TINY_SWINUNETR = dict(in_channels=1, num_classes=2, img_size=64, feature_size=12)


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if __import__("os").environ.get("CI"):
            pytest.fail(f"shared fixtures not found at {path}; CI must run with ../shared beside the clone")
        pytest.skip(f"shared fixtures not found at {path} (set MEDTUNING_SHARED)")
    return path


def tuned_gradients(net: torch.nn.Module) -> torch.Tensor:
    """The gradients of all tuned parameters, flattened into one vector."""
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.requires_grad])


def assert_gradients_close(ours: torch.Tensor, reference: torch.Tensor, rtol: float) -> None:
    """Gradient vectors equal to ``rtol`` relative to the reference's scale: a sum formed in another order
    differs by float32 rounding of its largest terms, which an element near zero shows as a large relative error."""
    torch.testing.assert_close(ours, reference, rtol=rtol, atol=rtol * reference.abs().max().item())


def assert_same_function(ours, reference, x: torch.Tensor, our_params, reference_params) -> None:
    """``ours(x)`` equals ``reference(x)``, and so do their gradients with respect to ``x`` and to their
    parameters (``our_params`` and ``reference_params``, in corresponding order)."""
    results = []
    for run, params in ((ours, our_params), (reference, reference_params)):
        v = x.clone().requires_grad_()
        out = run(v)
        results.append([out, *torch.autograd.grad(out.square().sum(), [v, *params])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def forward_keeping_saved(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``net(x)`` and the tensors its forward keeps for the backward pass, as an outer saved-tensor hook
    sees them (a checkpointed region shows only what it keeps for its recomputation)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x)
    return out, saved


def forward_counting_saved(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``net(x)`` and the bytes of :func:`forward_keeping_saved`'s tensors."""
    out, saved = forward_keeping_saved(net, x)
    return out, sum(t.numel() * t.element_size() for t in saved)


@pytest.fixture(scope="session", params=["medtuning_brats", "medtuning_kits", "medtuning_msd"])
def trained(request, tmp_path_factory):
    """A bundle trained for a few iterations on its demo data (prepared once per bundle, shared by every module)."""
    from medtuning.bundles.common import prepare_demo

    from .test_bundles import BUNDLES, TINY, TINY_PER_BUNDLE, demo_override, run_workflow

    bundle = request.param
    folder = tmp_path_factory.mktemp(bundle)
    work = prepare_demo(BUNDLES[bundle]["kind"], folder / "work")
    override = demo_override(bundle, "demo.json")
    override.update(TINY, dataset_dir=work, ckpt_dir=str(folder / "models"), output_dir=str(folder / "eval"))
    override.update(TINY_PER_BUNDLE.get(bundle, {}))
    run_workflow(bundle, ["train.json"], override, folder, "train")
    return bundle, folder, override
