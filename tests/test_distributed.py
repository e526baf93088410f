"""Multi-GPU training as the bundles set it up (``multi_gpu_train.json``: the network in DistributedDataParallel, a
distributed sampler): two processes on halves of a batch give the gradients one process gets on the whole batch.
Run on CPUs with gloo; the frozen blocks' recomputation and the methods' hooks must not upset DDP's reduction.

BatchNorm layers (UPerNet's, Med-Adapter's) normalise each process's batch by its own statistics, as they do
without SyncBatchNorm, and dropout draws its masks per process, so these comparisons run them on fixed statistics
and without masks: what is compared is the reduction."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medtuning.bundles.common import finish_distributed
from medtuning.networks import build_network

from .conftest import TINY_SWIN, TINY_VIT

CASES = {"vit_b16_upernet": (TINY_VIT, (4, 4, 8, 32, 32)), "swin_unet": (TINY_SWIN, (4, 4, 8, 64, 64))}


def tuned_gradients(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.requires_grad])


def make(name: str, method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    # no stochastic depth: its per-sample draws differ between one process and two
    net = build_network(name, method, frozen_precision="float32", **dict(CASES[name][0], drop_path_rate=0.0)).train()
    for module in net.modules():  # fixed statistics, no random masks (each process draws its own)
        if isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)):
            module.eval()
    torch.manual_seed(1)  # tuned parameters away from zero, so every gradient path carries signal
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return net


def batch(name: str) -> torch.Tensor:
    return torch.randn(*CASES[name][1], generator=torch.Generator().manual_seed(2))


def _rank(rank: int, world: int, store: str, name: str, method: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        net = torch.nn.parallel.DistributedDataParallel(make(name, method))
        x = batch(name).chunk(world)[rank]
        net(x).square().mean().backward()
        if rank == 0:
            torch.save(tuned_gradients(net.module), out)
        # the bundles' own teardown: destroying DDP's process group from its reducer at interpreter exit can
        # deadlock gloo's worker thread on the GIL
        finish_distributed(net)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("name,method", [("vit_b16_upernet", "lora"), ("swin_unet", "adapter"),
                                         ("swin_unet", "med_adapter")])
def test_two_processes_give_the_gradients_of_one_on_the_whole_batch(tmp_path, name, method):
    single = make(name, method)
    single(batch(name)).square().mean().backward()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ranks = mp.spawn(_rank, args=(2, str(tmp_path / "store"), name, method, str(tmp_path / "grads.pt")), nprocs=2,
                     join=False)
    deadline = time.monotonic() + 600  # a hang guard: a rank left waiting in a collective fails the test
    while not ranks.join(timeout=5):
        assert time.monotonic() < deadline, "the ranks did not finish"
    distributed = torch.load(tmp_path / "grads.pt", weights_only=True)
    expected = tuned_gradients(single)
    torch.testing.assert_close(distributed, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
