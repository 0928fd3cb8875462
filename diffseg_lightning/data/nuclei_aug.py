"""Label-fraction subsets chosen by k-means, and real + synthetic nuclei training sets (Yu et al., MICCAI 2023).

Yu et al. train the downstream network on 10, 20, 50 or 100% of the labelled images, the subset chosen by
k-means (k = 6) on image features, with and without the synthetic pairs of the two generators
(``diffseg-synthesize`` writes them in the MoNuSeg layout). :class:`KMeansLabelFraction` is that subset as a
dataset wrapper; :class:`AugmentedNuclei` concatenates it with a folder of synthetic pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.cluster.vq import kmeans2
from torch.utils.data import Dataset

from diffseg_lightning.utils.errors import ConfigError, DiffSegError

#: The keys every item of :class:`AugmentedNuclei` keeps (common to the real and the synthetic parts).
COMMON_KEYS = ("image", "mask", "instances", "case", "index")


def image_features(image: torch.Tensor) -> np.ndarray:
    """A colour and texture descriptor of one (C, H, W) image: per channel the mean, standard deviation,
    10th / 50th / 90th percentiles of the intensity and the mean gradient magnitude (5 C + C values).

    The paper clusters "image features" without naming the extractor; no pretrained network is available
    offline here, so these hand-made statistics (stain colour, contrast, texture) stand in for them.
    """
    x = image.double().flatten(1)
    q = torch.quantile(x, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), dim=1).T
    gy, gx = torch.gradient(image.double(), dim=(-2, -1))
    grad = torch.sqrt(gx**2 + gy**2).flatten(1).mean(1)
    return torch.cat([x.mean(1, keepdim=True), x.std(1, keepdim=True), q, grad[:, None]], 1).flatten().numpy()


def kmeans_subset(features: np.ndarray, fraction: float, k: int = 6, seed: int = 0) -> np.ndarray:
    """Indices of a ``fraction`` of the rows of ``features`` (N, D), chosen cluster by cluster.

    The features are standardised per dimension (zero mean, unit variance; constant dimensions left at 0)
    and clustered by k-means (scipy's :func:`~scipy.cluster.vq.kmeans2`, k-means++ initialisation, seeded)
    into ``min(k, N)`` clusters. ``M = max(1, round(fraction * N))`` images are kept (half rounds up), shared
    among the clusters in proportion to their sizes (largest-remainder apportionment: each cluster gets
    ``floor(M n_c / N)``, the leftover go to the largest remainders, ties to the larger cluster), and each
    cluster gives its members nearest to its centre (the most representative ones); ``fraction = 1`` keeps
    everything. (The paper says only "k-means on image features, k = 6"; how many images each cluster
    gives and which are ours.)

    Args:
        features: (N, D).
        fraction: in (0, 1].
        k: number of clusters.
        seed: seed of the k-means initialisation.

    Returns:
        Sorted int64 indices.
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise ConfigError(f"fraction must lie in (0, 1], got {fraction}")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] == 0:
        raise ConfigError(f"features must be a non-empty (N, D) array, got shape {features.shape}")
    n = features.shape[0]
    if fraction == 1.0:
        return np.arange(n)
    std = features.std(0)
    z = (features - features.mean(0)) / np.where(std > 0, std, 1.0)
    centres, assignment = kmeans2(z, min(k, n), minit="++", seed=np.random.default_rng(seed))
    sizes = np.bincount(assignment, minlength=centres.shape[0])
    total = max(1, int(fraction * n + 0.5))
    # largest-remainder apportionment of `total` over the clusters, proportional to their sizes
    quota = total * sizes / n
    take = np.floor(quota).astype(int)
    order = np.lexsort((-sizes, -(quota - take)))  # largest remainder first, then the larger cluster
    take[order[: total - take.sum()]] += 1
    chosen = []
    for c in np.flatnonzero(take):
        members = np.flatnonzero(assignment == c)
        distance = ((z[members] - centres[c]) ** 2).sum(1)
        chosen.extend(members[np.argsort(distance, kind="stable")[: take[c]]].tolist())
    return np.sort(np.asarray(chosen, dtype=np.int64))


class KMeansLabelFraction(Dataset):
    """The ``fraction`` of a labelled dataset that Yu et al. keep: k-means (k = 6) on image features.

    Reads every item once (in ``__init__``) for its :func:`image_features`, then keeps
    :func:`kmeans_subset`'s choice. Items are those of the wrapped dataset with ``index`` renumbered 0..n-1.
    (With a random-crop loader, e.g. MoNuSeg's ``crop="random"``, each image's features come from the one
    random window read then; the choice is still seeded by Lightning's global seed.) The name differs from
    :class:`diffseg_lightning.data.label_fraction.LabelFraction` (a seeded random fraction, FEDD's).
    ``selected`` lists the wrapped dataset's indices kept, ``cases`` their case names.

    Args:
        dataset: a zero-argument factory (a Hydra partial) or a dataset.
        fraction: in (0, 1]; 1 keeps every item without reading them.
        k: clusters.
        seed: k-means seed.
    """

    def __init__(
        self, dataset: Callable[[], Dataset] | Dataset, fraction: float = 1.0, k: int = 6, seed: int = 0
    ) -> None:
        super().__init__()
        self.dataset = dataset if isinstance(dataset, Dataset) else dataset()
        n = len(self.dataset)
        if float(fraction) == 1.0:
            self.selected = np.arange(n)
        else:
            features = np.stack([image_features(self.dataset[i]["image"]) for i in range(n)])
            self.selected = kmeans_subset(features, fraction, k, seed)
        self.fraction, self.k, self.seed = float(fraction), k, seed
        self.deterministic_items = getattr(self.dataset, "deterministic_items", True)

    def __len__(self) -> int:
        return len(self.selected)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[int(self.selected[index])])
        item["index"] = torch.tensor(index)
        return item


class AugmentedNuclei(Dataset):
    """Real (optionally a :class:`KMeansLabelFraction`) + synthetic training pairs, for the downstream network.

    The synthetic part is a folder written by ``diffseg-synthesize`` in the MoNuSeg layout
    (``Tissue Images/*.tif`` + ``Annotations/*.xml``), read by
    :class:`~diffseg_lightning.data.monuseg.MoNuSeg` (every image, whole, resized to ``size``). Items keep
    :data:`COMMON_KEYS` and are renumbered 0..N-1 (real first); ``case`` names say which part an item is.

    Args:
        real: factory (or dataset) of the real training items.
        synthetic_root: folder of synthetic pairs; None for the real items alone.
        fraction: label fraction of the real items (k-means subset); 1 keeps all.
        k: clusters of the subset.
        seed: seed of the subset.
        size: size of the synthetic items (H, W or int; None keeps the written size).
        max_synthetic: use at most this many synthetic pairs (the first by name); None: all.
    """

    def __init__(
        self,
        real: Callable[[], Dataset] | Dataset,
        synthetic_root: str | Path | None = None,
        fraction: float = 1.0,
        k: int = 6,
        seed: int = 0,
        size: int | Sequence[int] | None = None,
        max_synthetic: int | None = None,
    ) -> None:
        super().__init__()
        from diffseg_lightning.data.monuseg import MoNuSeg

        self.real = KMeansLabelFraction(real, fraction, k, seed)
        self.synthetic: Dataset | None = None
        if synthetic_root is not None:
            root = Path(synthetic_root)
            if not root.is_dir():
                raise DiffSegError(
                    f"synthetic_root {root} is not a folder (write one with diffseg-synthesize)"
                )
            self.synthetic = MoNuSeg(root, split="train", size=size, val_fraction=0.0)
        count = len(self.synthetic) if self.synthetic is not None else 0
        self.num_synthetic = count if max_synthetic is None else min(count, int(max_synthetic))
        self.deterministic_items = self.real.deterministic_items

    def __len__(self) -> int:
        return len(self.real) + self.num_synthetic

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"AugmentedNuclei: index {index} out of range for {len(self)} items")
        index = index % len(self)
        n_real = len(self.real)
        item = self.real[index] if index < n_real else self.synthetic[index - n_real]
        missing = [key for key in COMMON_KEYS if key not in item]
        if missing:
            raise DiffSegError(
                f"{item.get('case', index)}: item lacks {missing} (nuclei pairs need instance maps)"
            )
        out = {key: item[key] for key in COMMON_KEYS}
        out["index"] = torch.tensor(index)
        return out


__all__ = ["COMMON_KEYS", "AugmentedNuclei", "KMeansLabelFraction", "image_features", "kmeans_subset"]
