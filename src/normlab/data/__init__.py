"""MNIST and Fashion-MNIST from IDX files, as in-memory tensors.

Where the files come from, in order: an explicit ``root``, the ``NORMLAB_DATA`` environment
variable, the copy of MNIST bundled inside the package, the cache directory
(``$XDG_CACHE_HOME/normlab`` or ``~/.cache/normlab``), and last a download from the canonical
mirrors into the cache. A folder holds a dataset in ``<folder>/<name>/`` (or directly in
``<folder>/``) as the four canonical files, gzipped (``*.gz``) or raw. Every file is checked against
the SHA-256 of its decompressed bytes, which stay the same however a mirror compressed them; a
mismatch raises :class:`ChecksumError` naming the file, and a bad file is never used.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["Dataset", "ChecksumError", "DataError", "load", "fetch", "DATASETS", "MEAN_STD", "TRAIN_SIZES"]

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# SHA-256 of the decompressed IDX bytes.
DATASETS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

# Training-set sizes (checked when an experiment is validated, before any data is loaded).
TRAIN_SIZES: dict[str, int] = {"mnist": 60000, "fashion-mnist": 60000}

# Training-set pixel mean and std on the 0..1 scale.
MEAN_STD: dict[str, tuple[float, float]] = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}

_BUNDLED = Path(__file__).parent
_GZIP_MAGIC = b"\x1f\x8b"  # an IDX file starts with 00 00


class DataError(RuntimeError):
    """A dataset that cannot be had: a file that fails its checksum, or a download that failed."""


class ChecksumError(DataError):
    """A data file whose decompressed bytes do not have the expected SHA-256."""


@dataclass
class Dataset:
    """A dataset held in memory: images (N, 1, 28, 28) float32, normalized; labels (N,) int64."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    source: str

    @property
    def num_classes(self) -> int:
        """The number of classes: the largest training label + 1."""
        return int(self.train_y.max()) + 1


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "normlab"


def _find(folder: Path, name: str, fname: str) -> Path | None:
    for d in (folder / name, folder):
        for candidate in (d / f"{fname}.gz", d / fname):
            if candidate.is_file():
                return candidate
    return None


def _owner(digest: str) -> str | None:
    # "mnist's train-images-idx3-ubyte" when ``digest`` is that canonical file's, else None.
    return next((f"{name}'s {fname}" for name, files in DATASETS.items()
                 for fname, expected in files.items() if expected == digest), None)


def _read_verified(path: Path, expected: str) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:  # gzip by its magic bytes, whatever the name says
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ChecksumError(f"{path}: not a readable gzip file ({e}); delete or replace it") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected:
        other = _owner(digest)
        if other is not None:
            raise ChecksumError(
                f"{path}: this is {other}, not the file expected here; keep each dataset in its own "
                "subfolder (<folder>/mnist/, <folder>/fashion-mnist/)")
        raise ChecksumError(
            f"{path}: SHA-256 of the decompressed bytes is {digest}, expected {expected}; the file is "
            "corrupt or not the canonical one: delete or replace it (a copy in the cache is downloaded again)"
        )
    return raw


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} bytes")
    return data.reshape(shape)


def _download(name: str, fname: str, dest: Path, progress: bool) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    errors = []
    for mirror in MIRRORS[name]:
        url = mirror + fname + ".gz"
        # A temporary file of its own: sweep workers may download the same file at once.
        fd, part = tempfile.mkstemp(prefix=f"{fname}.", suffix=".part", dir=dest)
        os.close(fd)
        tmp = Path(part)
        try:
            if progress:
                print(f"normlab: downloading {url}")
            with urllib.request.urlopen(url, timeout=60) as response, tmp.open("wb") as f:
                shutil.copyfileobj(response, f)
            _read_verified(tmp, DATASETS[name][fname])
            with tmp.open("rb") as f:
                gzipped = f.read(2) == _GZIP_MAGIC
            target = dest / (f"{fname}.gz" if gzipped else fname)
            tmp.replace(target)
            return target
        except (OSError, ChecksumError, HTTPException) as e:
            errors.append(f"{url}: {e!r}" if isinstance(e, HTTPException) else f"{url}: {e}")
            tmp.unlink(missing_ok=True)
    raise DataError(f"could not download {fname} for {name}:\n  " + "\n  ".join(errors))


def _locate(name: str, root: str | os.PathLike | None, download: bool, progress: bool) -> tuple[list[Path], str]:
    if root is not None:
        folder = Path(root)
        paths = [_find(folder, name, f) for f in FILES]
        if not all(paths):
            missing = [f for f, p in zip(FILES, paths) if p is None]
            raise FileNotFoundError(
                f"{name}: root {folder} lacks {missing} (looked in {folder / name} and {folder}); put "
                "the four IDX files (.gz or raw) there, or leave root unset to use NORMLAB_DATA, the "
                "bundled copy, the cache or a download"
            )
        return paths, f"root: {folder}"  # type: ignore[return-value]
    candidates: list[tuple[Path, str]] = []
    if os.environ.get("NORMLAB_DATA"):
        candidates.append((Path(os.environ["NORMLAB_DATA"]), "NORMLAB_DATA"))
    if name == "mnist":
        candidates.append((_BUNDLED, "bundled"))
    candidates.append((_cache_dir(), "cache"))
    for folder, label in candidates:
        paths = [_find(folder, name, f) for f in FILES]
        if all(paths):
            return paths, f"{label}: {folder}"  # type: ignore[return-value]
        if label == "NORMLAB_DATA" and progress:  # set, so meant to be used: say why not (not in workers)
            warnings.warn(f"NORMLAB_DATA={folder} holds no complete copy of {name} (looked in {folder / name} "
                          f"and {folder}); looking further")
    if not download:
        raise FileNotFoundError(f"{name} is in none of {[str(c[0]) for c in candidates]} and download=False")
    cache = _cache_dir() / name
    try:
        paths = [_find(cache, name, f) or _download(name, f, cache, progress) for f in FILES]
    except DataError as e:
        looked = ", ".join(f"{c[0]} ({c[1]})" for c in candidates)
        raise DataError(f"{e}\n{name} has no local copy either (looked in {looked}): put its four IDX files "
                        f"(.gz or raw) in {cache}, or in a folder named by NORMLAB_DATA or root=") from None
    return paths, f"downloaded to {cache}"


def fetch(name: str = "mnist", *, progress: bool = True) -> str:
    """Make sure the four files of dataset ``name`` are on this machine, downloading them into the
    cache if no local copy exists (see the module docstring for the order), and say where they are.
    A sweep calls it once before starting its workers, so that they never download at once."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {sorted(DATASETS)}")
    return _locate(name, None, True, progress)[1]


_MEMO: dict[tuple, Dataset] = {}


def load(name: str = "mnist", root: str | os.PathLike | None = None, *, download: bool = True,
         normalize: bool = True, progress: bool = True) -> Dataset:
    """Load MNIST or Fashion-MNIST as in-memory tensors, checksums verified.

    Images are float32 (N, 1, 28, 28) on the 0..1 scale, standardized with the training set's
    pixel mean and std when ``normalize`` (``(x/255 - mean) / std``); labels int64. Results are
    memoized per process: every call returns the same tensors, so clone them before changing them in
    place. See the module docstring for where files are looked up.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {sorted(DATASETS)}")
    key = (name, None if root is None else str(Path(root).resolve()), os.environ.get("NORMLAB_DATA"), normalize)
    if key in _MEMO:
        return _MEMO[key]
    paths, source = _locate(name, root, download, progress)
    arrays = [_parse_idx(_read_verified(p, DATASETS[name][f]), p) for p, f in zip(paths, FILES)]
    train_x, train_y, test_x, test_y = arrays
    for x, y, split in ((train_x, train_y, "train"), (test_x, test_y, "test")):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{name} {split}: {x.shape[0]} images but {y.shape[0]} labels")

    def images(a: np.ndarray) -> Tensor:
        x = torch.from_numpy(a.copy()).unsqueeze(1).float().div_(255.0)
        if normalize:
            mean, std = MEAN_STD[name]
            x.sub_(mean).div_(std)
        return x

    ds = Dataset(name, images(train_x), torch.from_numpy(train_y.astype(np.int64)),
                 images(test_x), torch.from_numpy(test_y.astype(np.int64)), source)
    _MEMO[key] = ds
    return ds
