"""An on-disk cache of decoded, preprocessed items, memory-mapped, keyed by the preprocessing settings.

Decoding dominates the loaders' time (JPEG, BMP, TIFF, gzip'd NIfTI, DICOM; see
``experiments/results/loader_throughput.md``), so the DataModule can keep every item of a split, exactly
as the loader returned it, in one ``.npy`` file per field (``image.npy`` (N, C, H, W), ``mask.npy`` ...,
opened with ``mmap_mode="r"``), beside ``meta.json`` (string fields such as ``case``, the rows, the check
report). Later epochs and later runs read rows from the page cache: no decoding, no resizing.

The folder name is a hash of the loader's class, all its constructor arguments (root, split, size,
target, seed, ...) and a fingerprint of the files under ``root`` (relative path, size and modification
time of each), so a change of any setting or any file gives a new cache instead of a stale one.
No library fits: MONAI's ``PersistentDataset`` pickles one file per item (``torch.save``) and keys by
the item's input dict, not the loader's settings, and cannot memory-map fields.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import inspect
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from diffseg_lightning.data import base as base_module
from diffseg_lightning.data import masks as masks_module
from diffseg_lightning.data import transforms as transforms_module
from diffseg_lightning.data.check import SplitReport, as_row
from diffseg_lightning.io import files as files_module
from diffseg_lightning.io import images as images_module
from diffseg_lightning.io import volumes as volumes_module
from diffseg_lightning.utils.errors import DiffSegError

CACHE_VERSION = 1
META = "meta.json"
COUNTERS = ("sizes", "spacings", "annotators")  # SplitReport fields kept with the cache


def fingerprint(root: str | Path | None) -> list[tuple[str, int, int]]:
    """``(relative path, size, mtime_ns)`` of every file under ``root`` (sorted, symlinks followed); [] when
    ``root`` is not an existing path."""
    if root is None or not isinstance(root, (str, Path)) or not Path(root).exists():
        return []
    root = Path(root)
    if root.is_file():
        stat = root.stat()
        return [(root.name, stat.st_size, stat.st_mtime_ns)]
    out = []
    for folder, _, files in os.walk(root, followlinks=True):
        for name in files:
            stat = os.stat(os.path.join(folder, name))
            out.append((os.path.relpath(os.path.join(folder, name), root), stat.st_size, stat.st_mtime_ns))
    return sorted(out)


def names_a_path(key: str, value: Any) -> bool:
    """``root``, or a string argument that looks like a path (``splits_file=/data/splits_final.json``)."""
    return key == "root" or (isinstance(value, (str, Path)) and os.sep in str(value))


def source_digest(func: Any) -> str:
    """A hash of the code that makes the items: the loader's module, the shared data helpers (bad cases,
    resizing, the mask-value rule) and the file readers of :mod:`diffseg_lightning.io`, so that a fixed or
    changed loader never reads items an older version cached."""
    shared = (base_module, masks_module, transforms_module, files_module, images_module, volumes_module)
    modules = {inspect.getmodule(func), *shared}
    digest = hashlib.sha1()
    for path in sorted(str(inspect.getsourcefile(m)) for m in modules if m is not None):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def cache_folder(cache_dir: str | Path, split: str, factory: Any) -> Path:
    """``<cache_dir>/<Loader>-<split>-<hash>`` for a dataset factory (a ``functools.partial`` from Hydra).

    The hash covers the loader's class and code, every argument, and the files under every argument that
    names an existing path (``root``, and e.g. nnU-Net's ``splits_file``).

    Raises:
        DiffSegError: for a factory that is not a ``functools.partial``: its settings cannot be read, so a
            cache of it could not tell two configurations apart.
    """
    if not isinstance(factory, functools.partial):
        raise DiffSegError(
            f"data.cache_dir needs each split given as a loader with its arguments (a Hydra partial), got {factory!r}"
        )
    func, settings = factory.func, {**dict(enumerate(factory.args)), **factory.keywords}
    items = sorted(settings.items(), key=lambda kv: str(kv[0]))
    key = {
        "version": CACHE_VERSION,
        "loader": f"{func.__module__}.{getattr(func, '__qualname__', repr(func))}",
        "code": source_digest(func),
        "settings": {str(k): repr(v) for k, v in items},
        "files": {str(k): fingerprint(v) for k, v in items if names_a_path(str(k), v)},
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"{getattr(func, '__name__', 'dataset')}-{split}-{digest}"


@contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<folder>.lock`` while one process builds the cache: the other DDP ranks of
    the node wait for it, then read the published folder instead of building their own copy."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class CacheWriter:
    """Collects the items of one check pass into memory-mapped arrays in a temporary folder, then publishes it.

    Args:
        folder: the final cache folder (from :func:`cache_folder`).
        length: the dataset's length (rows are allocated for every item; bad ones are never referenced).
    """

    def __init__(self, folder: Path, length: int) -> None:
        self.folder = folder
        self.tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        self.length = length
        self.arrays: dict[str, np.ndarray] = {}
        self.strings: dict[str, list[str]] = {}
        self.rows: list[int] = []

    def add(self, index: int, item: dict[str, Any]) -> None:
        """Store ``item`` (the loader's output for ``index``) in row ``index``."""
        if not self.arrays and not self.strings:
            self.allocate(item)
        if set(item) != set(self.arrays) | set(self.strings):
            raise DiffSegError(
                f"{item.get('case', index)}: item fields {sorted(item)} differ from the first item's "
                f"{sorted(set(self.arrays) | set(self.strings))}; the cache needs the same fields in every item"
            )
        for name, array in self.arrays.items():
            value = as_row(item[name])
            if value.shape != array.shape[1:]:
                raise DiffSegError(
                    f"{item.get('case', index)}: {name} has shape {tuple(value.shape)} but the first item's is "
                    f"{tuple(array.shape[1:])}; the cache needs one shape per field (set data.size)"
                )
            array[index] = value
        for name, values in self.strings.items():
            values.append(str(item[name]))
        self.rows.append(index)

    def allocate(self, item: dict[str, Any]) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        for name, value in item.items():
            row = as_row(value)
            if row is None:
                self.strings[name] = []
            else:
                self.arrays[name] = np.lib.format.open_memmap(
                    self.tmp / f"{name}.npy", mode="w+", dtype=row.dtype, shape=(self.length, *row.shape)
                )

    def finish(self, report: SplitReport) -> ArrayCache:
        """Flush, write ``meta.json`` and move the folder into place; return the cache opened read-only.

        When another process (a DDP rank) published the same folder first, its copy is used.
        """
        if not self.rows:
            raise DiffSegError(
                f"{self.folder}: no item of the {report.split} split could be read; nothing to cache"
            )
        for array in self.arrays.values():
            array.flush()
        meta = {
            "version": CACHE_VERSION,
            "rows": self.rows,
            "arrays": sorted(self.arrays),
            "strings": self.strings,
            "report": {
                "dataset": report.dataset,
                "problems": report.problems,
                "labels": report.labels,
                **{name: list(getattr(report, name).items()) for name in COUNTERS},
            },
        }
        (self.tmp / META).write_text(json.dumps(meta))
        self.arrays.clear()  # close the memmaps before the move
        try:
            self.tmp.rename(self.folder)
        except OSError:  # published meanwhile by another process
            shutil.rmtree(self.tmp, ignore_errors=True)
        return ArrayCache(self.folder)


class ArrayCache(Dataset):
    """A split read back from its cache folder: the loader's items, field for field, from memory maps.

    Attributes:
        report: the check report stored with the cache (its problems, label values, item count).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        try:
            meta = json.loads((self.folder / META).read_text())
            self.arrays = {
                name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]
            }
        except (OSError, ValueError, KeyError) as err:
            raise DiffSegError(
                f"{self.folder}: a damaged data cache ({type(err).__name__}: {err}); delete the folder"
            ) from None
        self.rows: list[int] = meta["rows"]
        self.strings: dict[str, list[str]] = meta["strings"]
        stored = meta["report"]
        self.report = SplitReport(split="", dataset=stored["dataset"], items=len(self.rows))
        self.report.problems = [tuple(p) for p in stored["problems"]]
        self.report.labels = stored["labels"]
        for name in COUNTERS:
            getattr(self.report, name).update(
                {tuple(k) if isinstance(k, list) else k: n for k, n in stored[name]}
            )
        self.report.cases = list(dict.fromkeys(self.strings.get("case", [])))

    def __getstate__(self) -> dict[str, Any]:
        # Pickled (ddp_spawn, spawned DataLoader workers) as its folder, not as copies of the arrays.
        return {"folder": self.folder, "report": self.report}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"])
        self.report = state["report"]

    @staticmethod
    def exists(folder: Path) -> bool:
        return (folder / META).is_file()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict[str, Any]:
        row = self.rows[position]
        item: dict[str, Any] = {name: torch.from_numpy(np.array(a[row])) for name, a in self.arrays.items()}
        item.update({name: values[position] for name, values in self.strings.items()})
        return item
