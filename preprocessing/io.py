"""Reading and writing NIfTI volumes, and atomic file writes.

Arrays are handed around in nnU-Net's (channel, z, y, x) order, where z is the voxel axis closest to the
world's z (the slice axis). For ordinary files that is the reversed NIfTI axis order, exactly what nnU-Net's
SimpleITK reader gives. Files that store the slice axis first (KiTS19 keeps volumes as slices x 512 x 512)
are brought into the same order from their affine, and written back in their own order by the inverse.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import io
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np

try:  # ISA-L inflates gzip about twice as fast as zlib; same bytes
    from isal.igzip import decompress as inflate
except ImportError:  # pragma: no cover - isal is a core requirement, this keeps odd platforms working
    from gzip import decompress as inflate

NIFTI_ENDINGS = (".nii.gz", ".nii")


class DataError(ValueError):
    """A file or dataset that cannot be used as it is; the message names the file and the problem."""


DEBUG_VARIABLE = "MEDTUNING_DEBUG"


def own_error(error: BaseException | None) -> "DataError | None":
    """The project's own error behind ``error``, however deep a framework wrapped it (MONAI's config evaluation
    re-raises it as the cause of a RuntimeError), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, DataError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def install_short_errors() -> None:
    """An uncaught error of the project's own ends a command as one line, ``error: FILE: problem``, last on the
    screen; the whole traceback only with ``MEDTUNING_DEBUG=1``. Any other error keeps Python's own report."""
    previous = sys.excepthook

    def report(kind, value, traceback):
        error = own_error(value)
        if error is None or os.environ.get(DEBUG_VARIABLE):
            return previous(kind, value, traceback)
        sys.stderr.write(f"(the full traceback: {DEBUG_VARIABLE}=1)\nerror: {error}\n")

    if getattr(sys.excepthook, "__qualname__", "") != report.__qualname__:
        sys.excepthook = report


def plain(values, digits: int = 4) -> str:
    """Numbers as a reader writes them, ``(1.2, 0.8, 0.8)``, not numpy's ``np.float64(1.2)``."""
    return "(" + ", ".join(f"{round(float(v), digits):g}" for v in values) + ")"


def nifti_ending(path: str | os.PathLike) -> str | None:
    name = str(path)
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return ending
    return None


def strip_ending(name: str) -> str:
    ending = nifti_ending(name)
    return name[: -len(ending)] if ending else name


@dataclass
class Geometry:
    """Where a volume's voxels lie, enough to write a result back on the same grid."""

    affine: list[list[float]]
    shape: list[int]  # in the file's own voxel order (3D part)
    axes: list[int]  # file voxel axes in the order used for arrays: array axis i = file axis axes[i]
    spacing: list[float]  # per array axis (z, y, x)
    header: str = ""  # the NIfTI header, base64, so written results keep the original header fields
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"affine": self.affine, "shape": self.shape, "axes": self.axes, "spacing": self.spacing,
                "header": self.header}

    @classmethod
    def from_json(cls, d: dict) -> "Geometry":
        return cls(affine=d["affine"], shape=list(d["shape"]), axes=list(d["axes"]), spacing=list(d["spacing"]),
                   header=d.get("header", ""))

    @property
    def array_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.axes)

    def same_grid(self, other: "Geometry", atol: float = 1e-3) -> bool:
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol)


def array_axes(affine: np.ndarray) -> list[int]:
    """Voxel axes ordered from the one closest to world z down to the one closest to world x."""
    ornt = nib.orientations.io_orientation(np.asarray(affine))
    world = [int(w) for w in ornt[:3, 0]]
    return sorted(range(3), key=lambda axis: -world[axis])


def _load(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if nifti_ending(path) is None:
        raise DataError(f"{path}: not a NIfTI file (expected {' or '.join(NIFTI_ENDINGS)})")
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises several types for bad headers
        raise DataError(f"{path}: cannot read the NIfTI header ({error})") from error
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{path}: not a NIfTI image ({type(image).__name__})")
    return image


def read_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.ndarray, tuple[float, ...]]:
    """Shape, affine and voxel sizes without reading the voxels (cheap checks)."""
    image = _load(Path(path))
    return tuple(image.shape), image.affine, tuple(float(z) for z in image.header.get_zooms())


def read_volume(path: str | os.PathLike, allow_channels: bool = False,
                contiguous: bool = True) -> tuple[np.ndarray, Geometry]:
    """One file as an array in (z, y, x) order (channel first when allow_channels and the file is 4D);
    ``contiguous=False`` returns the transposed view of the file's array, for a caller that copies it anyway."""
    path = Path(path)
    image = _load(path)
    shape = tuple(int(n) for n in image.header.get_data_shape())
    claimed = int(np.prod(shape, dtype=np.float64) * image.header.get_data_dtype().itemsize)
    try:
        if nifti_ending(path) == ".nii.gz":
            # the whole file inflated in one call, not streamed through Python's gzip reader in small chunks
            blob = inflate(path.read_bytes())
            stored = len(blob)
            image = type(image).from_bytes(blob)
        else:
            stored = path.stat().st_size
        stored -= int(getattr(image.dataobj, "offset", 0))  # nibabel keeps the header offset on the data proxy
        if claimed > stored:  # said before allocating what the header asks for
            raise DataError(f"{path}: its header claims {' x '.join(map(str, shape))} voxels ({claimed:,} bytes) but "
                            f"the file holds {max(stored, 0):,} bytes of voxel data: a truncated file or a corrupt header")
        data = np.asanyarray(image.dataobj)
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"{path}: {' x '.join(map(str, shape))} voxels ({claimed / 2**30:.1f} GiB) need more memory "
                        f"than is free") from None
    except Exception as error:  # truncated gzip, short file, bad scaling
        raise DataError(f"{path}: cannot read the voxel data, the file is truncated or corrupt ({error})") from error
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 4 and not allow_channels:
        raise DataError(f"{path}: expected a 3D volume, found 4D data of shape {data.shape}")
    if data.ndim not in (3, 4):
        raise DataError(f"{path}: expected a 3D volume, found {data.ndim}D data of shape {data.shape}")
    axes = array_axes(image.affine)
    zooms = image.header.get_zooms()
    geometry = Geometry(affine=image.affine.tolist(), shape=[int(s) for s in data.shape[:3]], axes=axes,
                        spacing=[float(zooms[a]) for a in axes],
                        header=base64.b64encode(image.header.binaryblock).decode("ascii"))
    if data.ndim == 4:
        data = np.transpose(data, (3, *axes))
    else:
        data = np.transpose(data, axes)
    return (np.ascontiguousarray(data) if contiguous else data), geometry


def read_channels(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, Geometry]:
    """Several single-channel files of one case as a (c, z, y, x) float32 array, checked to share one grid."""
    stacked, first = None, None
    for c, path in enumerate(paths):
        data, geometry = read_volume(path, contiguous=False)  # converted into `stacked` directly
        if first is None:
            first = geometry
            stacked = np.empty((len(paths), *data.shape), dtype=np.float32)  # one copy, filled channel by channel
        elif not geometry.same_grid(first):
            raise DataError(f"{path}: on a different grid than {paths[0]} (shape {geometry.shape} vs {first.shape}, "
                            f"or a different affine)")
        check_finite(data, path)
        stacked[c] = data
        del data
    return stacked, first


def check_finite(data: np.ndarray, path: str | os.PathLike) -> None:
    """A DataError naming ``path`` if its voxels hold NaN or Inf (integer voxels cannot: no pass over them)."""
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise DataError(f"{path}: contains NaN or Inf voxels")


def label_values(seg: np.ndarray) -> list[int]:
    """Sorted distinct values of an integer label map: a comparison pass per value of a small range
    instead of np.unique's hashing or sorting of the whole volume."""
    if seg.size == 0:
        return []
    if seg.dtype.kind in "iub":
        low, high = int(seg.min()), int(seg.max())
        if high - low < 256:
            return [v for v in range(low, high + 1) if (seg == v).any()]
    return [int(v) for v in np.unique(seg)]


def to_file_order(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Undo read_volume's axis order: (z, y, x) array -> the file's voxel order."""
    return np.transpose(array, np.argsort(geometry.axes))


WRITE_PROBLEMS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied"}


def write_problem(error: BaseException) -> str | None:
    """What stopped a write, in words, when it is the disk's or the folder's fault (None otherwise)."""
    if isinstance(error, OSError) and error.errno in WRITE_PROBLEMS:
        return WRITE_PROBLEMS[error.errno]
    text = str(error).lower()  # writers that wrap the OS error in their own (nibabel, torch's zip writer)
    if any(sign in text for sign in ("no space left", "file write failed", "problem writing element", "requested and")):
        return "no space left on the device"
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` that replaces it only when the block finishes without error.

    ``durable``: the file's bytes and its new name reach the disk before this returns (fsync), for files a
    crash must not take back (training checkpoints). A full disk or an unwritable folder is a DataError
    naming ``path``; the file that was there before stays as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        ending = nifti_ending(path) or path.suffix
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", suffix=ending, dir=path.parent)
        os.close(fd)
    except OSError as error:
        raise DataError(f"{path}: cannot be written: {write_problem(error) or error}") from None
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():  # mkstemp made it 0600; a finished file gets the mode the user's umask gives
            os.chmod(tmp, 0o666 & ~current_umask())
            if durable:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            sync_folder(path.parent)
    except (OSError, RuntimeError, ValueError) as error:
        problem = write_problem(error)
        if problem is None:
            raise
        raise DataError(f"{path}: cannot be written: {problem}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def sync_folder(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


LOCK_FILE = ".medtuning.lock"


class FolderBusy(DataError):
    """Another live run holds the folder."""


_HELD_LOCKS: set = set()  # lock files this process holds (folder_lock)


def _close_inherited_locks() -> None:
    # A forked child (a DataLoader or pool worker) gets a copy of the lock's descriptor, and a flock lasts until every
    # copy is closed: a worker outliving its run (persistent workers in a long-lived process such as a MONAI Label
    # server) would hold the folder after the run ended. The child never needs the lock, so it closes its copies.
    for handle in list(_HELD_LOCKS):
        try:
            handle.close()
        except OSError:
            pass
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run") -> Iterator[Path]:
    """Hold ``folder`` for this run: a second run that asks for it gets one clear error and touches nothing.

    An advisory ``flock`` on ``FOLDER/.medtuning.lock``: the kernel drops it when the holder dies, however it
    dies, so a killed run never leaves the folder blocked. The file names the holder for the message.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_FILE, "a+")
    except OSError as error:
        raise DataError(f"{folder}: cannot be written: {write_problem(error) or error}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise FolderBusy(f"{folder}: in use by another {what} ({holder}); wait for it to finish, or use "
                             f"another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        _HELD_LOCKS.add(handle)
        yield folder
    finally:
        _HELD_LOCKS.discard(handle)
        handle.close()


def current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete temporaries a killed run left behind; returns how many."""
    count = 0
    for tmp in Path(folder).glob(".tmp-*"):
        tmp.unlink(missing_ok=True)
        count += 1
    return count


def write_volume(path: str | os.PathLike, array: np.ndarray, geometry: Geometry, dtype=None) -> Path:
    """Write a (z, y, x) array on `geometry`'s grid, keeping the original header's fields, atomically."""
    data = to_file_order(np.asarray(array), geometry)
    if tuple(data.shape) != tuple(geometry.shape):
        raise DataError(f"{path}: array of shape {data.shape} does not fit the target grid {geometry.shape}")
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    header = None
    if geometry.header:
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(base64.b64decode(geometry.header)))
    image = nib.Nifti1Image(data, np.asarray(geometry.affine), header=header)
    image.set_data_dtype(data.dtype)
    if header is not None:
        # keep the original qform/sform codes; the scaling of the original does not apply to labels
        image.set_qform(np.asarray(geometry.affine), code=int(header["qform_code"]) or 1)
        image.set_sform(np.asarray(geometry.affine), code=int(header["sform_code"]) or 1)
        image.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return Path(path)


def save_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, dtype=None) -> Path:
    """Write an array in file voxel order with an affine, atomically (conversion and demo data)."""
    data = np.asarray(data)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    image = nib.Nifti1Image(data, np.asarray(affine))
    image.set_data_dtype(data.dtype)
    image.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return Path(path)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)
    return Path(path)


PREPROCESSED_ENDINGS = (".npy", ".b2nd")


def read_array(path: str | os.PathLike, mapped: bool = False):
    """A preprocessed array: ``.npy`` (this pipeline's, read whole or memory-mapped) or ``.b2nd`` (nnU-Net v2's
    Blosc2 chunks; mapped, it decompresses only the chunks a slice touches). Mapped arrays are sliced like NumPy
    arrays and slices come back as NumPy arrays. A file that is neither, or damaged, is one DataError naming it."""
    path = Path(path)
    try:
        if path.name.endswith(".b2nd"):
            try:
                import blosc2
            except ImportError:
                raise DataError(f"{path}: Blosc2 arrays (nnU-Net v2's .b2nd) need the blosc2 package "
                                f"(pip install blosc2)") from None
            # one thread: DataLoader workers are the parallelism, as in nnU-Net's loader
            array = blosc2.open(str(path), mode="r", mmap_mode="r", dparams={"nthreads": 1})
            return array if mapped else array[...]
        if not path.name.endswith(".npy"):
            raise DataError(f"{path}: not a preprocessed array (expected one of {', '.join(PREPROCESSED_ENDINGS)})")
        return np.load(path, mmap_mode="r" if mapped else None)
    except DataError:
        raise
    except (OSError, ValueError, RuntimeError) as error:
        raise DataError(f"{path}: cannot be read as a preprocessed array ({error})") from None


def read_json(path: str | os.PathLike, missing: str) -> dict:
    """A JSON file, or a DataError naming it: ``missing`` says what to do when it is not there."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from error


def save_json(path: str | os.PathLike, obj) -> Path:
    """JSON as the standard has it: a value that is not a number (NaN, infinity) is written as null."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite(obj), indent=1, default=_json_default, allow_nan=False))
    return Path(path)


def _finite(value):
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return value


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
