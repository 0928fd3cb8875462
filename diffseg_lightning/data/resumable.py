"""A training loader whose order depends only on (seed, epoch), and which Lightning resumes mid-epoch.

Lightning 2.6 resumes a run that stopped part-way through an epoch by starting the epoch's remaining
batches from a *new* iterator of the training loader, unless the loader implements ``state_dict`` /
``load_state_dict`` (its ``_Stateful`` protocol; otherwise it warns "your dataloader is not resumable").
With a plain ``DataLoader(shuffle=True)`` the new iterator draws a new permutation from the global RNG,
so the resumed epoch sees other images than the uninterrupted one, and creating it draws from the global
RNG, which shifts the training noise. :class:`ResumableLoader` and :class:`EpochSampler` make the order
exact: the permutation of an epoch is a function of the seed and the epoch only, the loader counts the
batches it handed out, and after :meth:`ResumableLoader.load_state_dict` the epoch's iteration starts
after them. No global RNG state is touched by the loader.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (this process's share of a permutation seeded with ``seed + epoch``) that can
    start part-way into an epoch.

    It is a ``DistributedSampler``, so Lightning keeps it under DDP (it injects its own only where the
    sampler is not one) and calls :meth:`set_epoch` before every epoch. ``skip`` is the number of this
    process's indices to leave out at the start of the next iteration (then reset to 0).
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return iter(list(super().__iter__())[skip:])


class ResumableLoader(DataLoader):
    """A ``DataLoader`` that Lightning saves and restores mid-epoch (``state_dict`` / ``load_state_dict``).

    The state is the sampler's epoch and the number of batches handed out in it. Iteration starts lazily,
    at the first batch: Lightning creates the epoch's iterator before it calls ``set_epoch`` on a resumed
    run, and worker processes read the sampler as soon as the iterator exists. The ``generator`` (the
    workers' base seed) is reseeded per epoch, so creating an iterator never draws from the global RNG.
    With any other sampler (e.g. Lightning's ``overfit_batches`` replacing it) it is a plain ``DataLoader``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(*args, **kwargs)
        self._batches = 0  # batches handed out in the current epoch
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        sampler = self.sampler
        self._batches = 0
        if isinstance(sampler, EpochSampler):
            if self._resume is not None and self._resume["epoch"] == sampler.epoch:
                self._batches = self._resume["batches"]
                sampler.skip = self._batches * (self.batch_size or 1)
            self._resume = None
            self.generator.manual_seed(sampler.seed * 1_000_003 + sampler.epoch)
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": getattr(self.sampler, "epoch", 0), "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue the saved epoch after its saved batches (applied at the next iteration of that epoch)."""
        self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}
