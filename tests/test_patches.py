"""Training patches read from memory-mapped preprocessed cases (bundles/patches.py): the box rule, the
foreground rule, padding at the borders, determinism, and the loader benchmark's output."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from medtuning.bundles.patches import Case, PatchDataset, TrainingCases, forced_foreground, patch_box
from medtuning.preprocessing.case import sample_class_locations

from .conftest import REPO


def write_case(folder, name="case_000", shape=(20, 30, 40), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((2, *shape)).astype(np.float32)
    seg = np.zeros(shape, np.int8)
    seg[5:8, 10:14, 30:36] = 1  # a small object near the x border
    seg[:, :, :3] = -1  # outside the nonzero mask
    np.save(folder / f"{name}.npy", image)
    np.save(folder / f"{name}_seg.npy", seg[None])
    locations = sample_class_locations(seg[None], [1])
    np.savez(folder / f"{name}_locations.npz", **{str(k): v for k, v in locations.items()})
    return {"image": str(folder / f"{name}.npy"), "label": str(folder / f"{name}_seg.npy"), "case_id": name}, image, seg


def write_blosc2_case(folder, item, image, seg, chunks=(1, 8, 16, 16), blocks=(1, 4, 8, 8)):
    """The same case as nnU-Net v2 stores it: CASE.b2nd and CASE_seg.b2nd in chunks smaller than the case (the
    locations file beside them is shared)."""
    blosc2 = pytest.importorskip("blosc2")
    name = item["case_id"]
    blosc2.asarray(image, urlpath=str(folder / f"{name}.b2nd"), chunks=chunks, blocks=blocks, mode="w")
    blosc2.asarray(seg[None], urlpath=str(folder / f"{name}_seg.b2nd"), chunks=chunks, blocks=blocks, mode="w")
    return {"image": str(folder / f"{name}.b2nd"), "label": str(folder / f"{name}_seg.b2nd"), "case_id": name}


def test_nnunet_oversampling_rule():
    assert [forced_foreground(i, 2) for i in range(2)] == [False, True]
    assert [forced_foreground(i, 3) for i in range(3)] == [False, False, True]
    assert [forced_foreground(i, 6) for i in range(6)] == [False] * 4 + [True] * 2


def test_patch_boxes_fit_or_pad_evenly_and_centre_where_asked():
    rng = np.random.RandomState(0)
    for _ in range(200):
        lower = patch_box((20, 30, 40), (8, 30, 50), rng)
        assert 0 <= lower[0] <= 12 and lower[1] == 0 and -5 <= lower[2] <= -5 + 0  # 40 < 50: padded 5 each side
    assert patch_box((20, 30, 40), (8, 10, 10), rng, centre=(10, 15, 20)) == [6, 10, 15]
    assert patch_box((20, 30, 40), (8, 10, 10), rng, centre=(0, 29, 39)) == [0, 20, 30]  # kept inside


def test_a_patch_is_the_region_with_zero_image_and_background_label_outside(tmp_path):
    item, image, seg = write_case(tmp_path)
    case = Case.open(item)
    assert isinstance(case.image, np.memmap) and isinstance(case.label, np.memmap)  # nothing read until asked
    got_image, got_label = case.read([-2, 25, 36], [6, 8, 8])
    padded_image = np.pad(image, ((0, 0), (2, 0), (0, 3), (0, 4)))
    padded_label = np.pad(np.maximum(seg, 0), ((2, 0), (0, 3), (0, 4)))
    np.testing.assert_array_equal(got_image, padded_image[:, 0:6, 25:33, 36:44])
    np.testing.assert_array_equal(got_label, padded_label[0:6, 25:33, 36:44])


def test_foreground_samples_are_centred_on_foreground_and_the_rest_anywhere(tmp_path):
    item, _, seg = write_case(tmp_path)
    dataset = PatchDataset(TrainingCases([item]), [8, 8, 8], length=400, batch_size=2)
    dataset.set_random_state(0)
    centres = {True: 0, False: 0}
    for i in range(400):
        label = dataset[i]["label"][0]
        centres[forced_foreground(i % 2, 2)] += int(label[4, 4, 4] > 0)
    assert centres[True] == 200  # every forced sample: the object is small enough for its centre to be inside
    fraction = (seg > 0).mean()
    assert centres[False] < 200 * max(10 * fraction, 0.1)  # the others only by chance


def test_same_seed_same_patches_and_augmentations(tmp_path):
    from monai.transforms import Compose

    from medtuning.bundles.common import patch_transforms

    item, _, _ = write_case(tmp_path)

    def patches(seed):
        dataset = PatchDataset(TrainingCases([item]), [8, 8, 8], 6, 2, Compose(patch_transforms()))
        dataset.set_random_state(seed)
        return torch.stack([dataset[i]["image"] for i in range(6)])

    assert torch.equal(patches(3), patches(3)) and not torch.equal(patches(3), patches(4))


def test_lazy_flips_give_the_patches_one_flip_at_a_time_gives(tmp_path):
    """The configs compose the augmentations lazily (MONAI does the chosen flips as one); for the same seed the
    images and byte region labels are exactly those of flipping axis by axis."""
    from monai.transforms import Compose

    from medtuning.bundles.common import patch_transforms
    from medtuning.bundles.metrics import LabelsToRegionsd

    item, _, _ = write_case(tmp_path)
    regions = [LabelsToRegionsd(keys="label", regions=[[1]])]

    def patches(lazy):
        dataset = PatchDataset(TrainingCases([item]), [8, 12, 16], 12, 3, Compose(patch_transforms(regions), lazy=lazy))
        dataset.set_random_state(5)
        return [dataset[i] for i in range(12)]

    for lazy, eager in zip(patches(True), patches(False)):
        assert torch.equal(lazy["image"], eager["image"]) and torch.equal(lazy["label"], eager["label"])
        assert lazy["image"].dtype == torch.float32 and lazy["label"].dtype == torch.uint8
    assert regions[0].dtype == torch.float32  # the configured transform (validation's) is left as it is


def test_prepare_batch_casts_byte_labels_on_the_device():
    from medtuning.bundles.common import prepare_batch

    batch = {"image": torch.zeros(2, 1, 4, 4, 4), "label": torch.ones(2, 3, 4, 4, 4, dtype=torch.uint8)}
    image, label = prepare_batch(batch, torch.device("cpu"))
    assert image.dtype == torch.float32 and label.dtype == torch.float32 and torch.equal(label, torch.ones_like(label))


def test_blosc2_cases_give_the_same_patches_as_npy_cases(tmp_path):
    """nnU-Net v2's .b2nd arrays are read chunk by chunk, mapped; for the same seed a patch dataset on them yields
    exactly the patches of the .npy case (bounds, padding, foreground centring), and LoadCased reads them whole."""
    from monai.transforms import Compose

    from medtuning.bundles.common import LoadCased, patch_transforms

    item, image, seg = write_case(tmp_path)
    packed = write_blosc2_case(tmp_path, item, image, seg)

    def patches(entry):
        dataset = PatchDataset(TrainingCases([entry]), [8, 12, 16], 24, 3, Compose(patch_transforms(), lazy=True))
        dataset.set_random_state(1)
        return [dataset[i] for i in range(24)]

    for a, b in zip(patches(item), patches(packed)):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not isinstance(Case.open(packed).image, np.ndarray)  # mapped: only the chunks a patch touches are read
    loaded = LoadCased()(dict(packed))
    np.testing.assert_array_equal(loaded["image"], image)
    np.testing.assert_array_equal(loaded["label"], seg[None])


def test_blosc2_cases_without_blosc2_or_damaged_name_their_file(tmp_path, monkeypatch):
    from medtuning.preprocessing.io import DataError

    item, image, seg = write_case(tmp_path)
    packed = write_blosc2_case(tmp_path, item, image, seg)
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "blosc2", None)
        with pytest.raises(DataError, match=r"case_000\.b2nd: Blosc2 arrays .* need the blosc2 package"):
            TrainingCases([packed])[0]
    (tmp_path / "case_000.b2nd").write_bytes(b"not an array")
    with pytest.raises(DataError, match=r"case_000\.b2nd: cannot be read as a preprocessed array"):
        TrainingCases([packed])[0]


def test_cache_rate_reads_cases_into_memory(tmp_path):
    items = [write_case(tmp_path, f"case_{i:03d}", seed=i)[0] for i in range(4)]
    cases = TrainingCases(items, cache_rate=0.5)
    kinds = [isinstance(cases[i].image, np.memmap) for i in range(4)]
    assert kinds == [False, False, True, True]


def test_an_unreadable_case_names_its_file(tmp_path):
    from medtuning.preprocessing.io import DataError

    item, _, _ = write_case(tmp_path)
    (tmp_path / "case_000.npy").write_bytes(b"not an array")
    with pytest.raises(DataError, match="case_000.npy: cannot be read as a preprocessed array"):
        TrainingCases([item])[0]


MAPPED_BYTES = r"""
import ctypes, json, sys
import numpy as np
from medtuning.bundles.patches import PatchDataset, TrainingCases

class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
dataset = PatchDataset(TrainingCases([json.loads(sys.argv[1])]), [128, 128, 128], 2, 2)
dataset.set_random_state(0)
dataset[0]  # the first patch of this process
buffer = np.ones((4, 128, 128, 128), np.float32)  # a BraTS patch: 32 MiB, past glibc's own largest threshold
print(mallinfo2().hblkhd >= buffer.nbytes)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize("user_setting", [None, "131072"])
def test_patch_sized_buffers_come_from_the_heap_unless_the_user_set_glibc(tmp_path, user_setting):
    import ctypes
    import os

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc >= 2.33")
    item, _, _ = write_case(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update({"MALLOC_MMAP_THRESHOLD_": user_setting} if user_setting else {})
    out = subprocess.run([sys.executable, "-c", MAPPED_BYTES, json.dumps(item)], env=env, capture_output=True,
                         text=True, check=True)
    # mapped (and zero-filled again at every patch) only where the user's own setting says so
    assert out.stdout.split()[-1] == ("True" if user_setting else "False")


@pytest.mark.slow
def test_loader_benchmark_prints_and_writes_its_ratios(tmp_path):
    page = tmp_path / "loader.md"
    out = subprocess.run([sys.executable, "-m", "medtuning.bundles.benchmark_loader", "--cases", "2", "--shape", "24",
                          "40", "40", "--patch", "16", "32", "32", "--batches", "2", "--workers", "0", "2",
                          "--pipelines", "patches", "monai-before", "nnunet", "--markdown", str(page)],
                         cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr
    assert "nnunet         npy   workers 0: not measured: give --nnunet-python" in out.stdout
    assert "b2nd written by blosc2 with its default chunks" in out.stdout  # no nnU-Net here to write them
    assert "monai-before   npy   workers 2:" in out.stdout  # the pipeline as it ran before, side by side
    for kind in ("patches/s per CPU-second", "b2nd vs npy"):  # a ratio per worker count, measured
        ratios = [line for line in out.stdout.splitlines() if line.startswith(kind)]
        assert len(ratios) == 2 and all(math.isfinite(float(r.split(": x")[1].split()[0])) for r in ratios)
    text = page.read_text()
    assert text.startswith("# Benchmarks: training data loader")
    assert "| patches | npy | 2 |" in text and "| patches | b2nd | 2 |" in text


class Numbered(torch.utils.data.Dataset):
    def __len__(self):
        return 60

    def __getitem__(self, index):
        return {"image": torch.full((3, 5), float(index)), "label": torch.full((1, 5), index % 256, dtype=torch.uint8),
                "case_id": f"case_{index}"}


@pytest.mark.parametrize("workers,persistent", [(2, True), (3, False)])
def test_shared_batch_ring_never_overwrites_a_batch_the_loop_still_holds(workers, persistent):
    """Workers reuse their buffers in turn; every batch arrives whole, and the one before it is still intact when
    the next arrives (the training loop holds one batch while it asks for the next), over several epochs."""
    from monai.data import DataLoader

    from medtuning.bundles.patches import SharedBatchRing

    loader = DataLoader(Numbered(), batch_size=4, num_workers=workers, collate_fn=SharedBatchRing(),
                        persistent_workers=persistent, prefetch_factor=2)
    for _ in range(3):
        previous, seen = None, 0
        for i, batch in enumerate(loader):
            expected = torch.arange(4 * i, 4 * i + 4, dtype=torch.float32)
            assert torch.equal(batch["image"][:, 0, 0], expected) and batch["case_id"][0] == f"case_{4 * i}"
            assert torch.equal(batch["label"][:, 0, 0], expected.to(torch.uint8))
            if previous is not None:
                assert torch.equal(previous["image"][:, 0, 0], expected - 4)  # not yet written over
            previous, seen = batch, seen + 1
        assert seen == 15


def test_shared_batch_ring_in_the_training_process_is_the_usual_collate():
    from medtuning.bundles.patches import SharedBatchRing

    batch = SharedBatchRing()([Numbered()[0], Numbered()[1]])
    assert batch["image"].shape == (2, 3, 5) and not batch["image"].is_shared()
    with pytest.raises(ValueError, match="prefetch_factor"):
        SharedBatchRing(depth=2)
