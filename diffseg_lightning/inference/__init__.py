"""Multi-sample inference: batched sampling, fusion of the S samples (mean, vote, STAPLE, MB-Diff's evolution
fusion), uncertainty maps."""

from diffseg_lightning.inference.evidence import (
    TotalConflictError,
    contextual_discount,
    dempster,
    dempster_opinions,
    dirichlet_opinion,
    discounted_plausibility,
)
from diffseg_lightning.inference.fusion import (
    Fusion,
    check_learned_variance,
    evolution_fusion,
    final_step_log_variance,
    fuse_samples,
    staple,
)
from diffseg_lightning.inference.sampler import (
    DiffusionSampler,
    describe_samples,
    repeat_condition,
    slice_condition,
)
from diffseg_lightning.inference.uncertainty import mutual_information, predictive_entropy, sample_std

__all__ = [
    "DiffusionSampler",
    "Fusion",
    "TotalConflictError",
    "check_learned_variance",
    "contextual_discount",
    "dempster",
    "dempster_opinions",
    "describe_samples",
    "dirichlet_opinion",
    "discounted_plausibility",
    "evolution_fusion",
    "final_step_log_variance",
    "fuse_samples",
    "mutual_information",
    "predictive_entropy",
    "repeat_condition",
    "sample_std",
    "slice_condition",
    "staple",
]
