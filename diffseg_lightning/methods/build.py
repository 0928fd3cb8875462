"""Building a method from its configs, and rebuilding a trained one from its checkpoint.

Below the entry points (``entry.py``, the CLIs) so that :meth:`SegmentationMethod.load_from_checkpoint`
(``methods/base.py``) can use it without an upward import.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from diffseg_lightning.inference.sampler import DiffusionSampler
from diffseg_lightning.utils.errors import DiffSegError
from diffseg_lightning.utils.moved_settings import split_moved_settings, with_stored_solver


def accepted_parameters(cls: type) -> set[str]:
    """The keyword arguments ``cls(...)`` accepts: the named parameters of its ``__init__``, followed up the
    MRO through an ``__init__`` that forwards ``**kwargs`` (e.g. ``UNetInstanceModule``)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names.update(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


def build_module(
    model_cfg: DictConfig,
    noise_cfg: DictConfig | None,
    sampler_cfg: DictConfig | DiffusionSampler | None,
    **overrides: Any,
) -> L.LightningModule:
    """Instantiate the LightningModule with its kernel and inference recipe (all from Hydra configs).

    ``kernel=`` (built from ``noise_cfg``) and ``sampler=`` (built from ``sampler_cfg``, or given built) are
    passed only to a method whose ``__init__`` takes them (:func:`accepted_parameters`): the U-Net baseline
    takes no kernel, the image DDPM no sampler. They are passed to the partial module, not merged into its
    config, so Hydra does not turn them back into config nodes.

    Args:
        model_cfg: the ``model`` node (a ``_target_`` method class and its arguments).
        noise_cfg: the ``noise`` node; not built when the method takes no kernel.
        sampler_cfg: the ``sampler`` node, or a built :class:`DiffusionSampler`; not used when the method
            takes no sampler.
        **overrides: constructor arguments that replace the config's (objects allowed).
    """
    module_factory = instantiate(model_cfg, _partial_=True)
    accepted = accepted_parameters(module_factory.func)
    kwargs: dict[str, Any] = {}
    if "kernel" in accepted:
        kwargs["kernel"] = instantiate(noise_cfg) if noise_cfg is not None else None
    if "sampler" in accepted:
        built = sampler_cfg is None or isinstance(sampler_cfg, DiffusionSampler)
        kwargs["sampler"] = sampler_cfg if built else instantiate(sampler_cfg)
    return module_factory(**kwargs, **overrides)


#: Model settings that never change the shapes of the weights (left out of a mismatch report).
NON_ARCHITECTURE_KEYS = ("optimizer", "scheduler", "compile", "channels_last")


def module_from_checkpoint(
    checkpoint: dict[str, Any],
    sampler_cfg: DictConfig | DiffusionSampler | None,
    **model_overrides: Any,
) -> L.LightningModule:
    """Rebuild the trained module from the config stored in its checkpoint, with a new sampler;
    ``model_overrides`` replace constructor arguments of the stored ``model`` config (:func:`build_module`).

    A checkpoint written before the solvers were split off from the kernels stores its reverse update in
    ``noise.sampling`` / ``noise.eta`` / ``noise.clip_x0`` (``noise.binarize_final``): that solver is used, with
    one warning, when the sampler has none of its own (``sampler.solver: null``, e.g. ``sampler=default``);
    ``sampler=ddim|ddpm|...`` wins (:func:`~diffseg_lightning.utils.moved_settings.with_stored_solver`).
    Likewise a newer checkpoint's own ``sampler.solver`` (e.g. gland diffusion's unclipped DDIM, eta 1) is
    used when the sampler has none, as the kernel's sampling options were before the split.
    """
    run_cfg = OmegaConf.create(checkpoint["diffseg_config"])
    stored = OmegaConf.to_container(run_cfg.noise, resolve=True)
    run_sampler = run_cfg.get("sampler")
    run_solver = run_sampler.get("solver") if isinstance(run_sampler, DictConfig) else None
    if isinstance(sampler_cfg, DiffusionSampler):  # built: the same rule as for a config
        moved = split_moved_settings(stored)
        noise, moved = moved.noise, moved if moved.solver is not None and sampler_cfg.solver is None else None
        if moved is not None:
            sampler_cfg = dataclasses.replace(sampler_cfg, solver=instantiate(moved.solver))
        elif sampler_cfg.solver is None and run_solver is not None:
            sampler_cfg = dataclasses.replace(sampler_cfg, solver=instantiate(run_solver))
    else:
        plain = OmegaConf.to_container(sampler_cfg, resolve=True) if sampler_cfg is not None else None
        noise, plain, moved = with_stored_solver(stored, plain)
        if moved is not None:
            sampler_cfg = OmegaConf.create(plain)
        elif (
            plain is not None
            and "_target_" in plain
            and plain.get("solver") is None
            and run_solver is not None
        ):
            sampler_cfg = OmegaConf.create(
                {**plain, "solver": OmegaConf.to_container(run_solver, resolve=True)}
            )
    if moved is not None:
        path = getattr(checkpoint, "path", "(in memory)")
        rank_zero_warn(
            f"checkpoint {path}: {moved.old} is now {moved.new} (solver settings moved out of the noise kernel); "
            "using it",
            category=FutureWarning,
        )
    module = build_module(run_cfg.model, OmegaConf.create(noise), sampler_cfg, **model_overrides)
    check_weights(module, checkpoint, "the model its own config builds (written by another version?)")
    module.load_state_dict(checkpoint["state_dict"])
    module.run_config = checkpoint["diffseg_config"]
    return module


def _flatten(node: Any, prefix: str) -> dict[str, Any]:
    """A nested config as ``{"model.denoiser.base_channels": 32, ...}`` (lists are values)."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}.{key}"))
    return flat


def config_differences(old: Any, new: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for every setting that differs between two config sections (a key
    missing on one side has the value ``"<absent>"``); ``_target_`` keys first."""
    a, b = _flatten(old or {}, prefix), _flatten(new or {}, prefix)
    absent = "<absent>"
    keys = sorted(set(a) | set(b), key=lambda k: (not k.endswith("._target_"), k.count("."), k))
    return [(k, a.get(k, absent), b.get(k, absent)) for k in keys if a.get(k, absent) != b.get(k, absent)]


def describe_differences(differences: list[tuple[str, Any, Any]], limit: int = 3) -> str:
    shown = [f"{key}={old} in the checkpoint, {new} now" for key, old, new in differences[:limit]]
    more = len(differences) - limit
    return "; ".join(shown) + (f" (and {more} more setting(s))" if more > 0 else "")


def check_weights(
    module: L.LightningModule, checkpoint: dict[str, Any], built_by: str, model_cfg: Any | None = None
) -> None:
    """Check, without loading, that ``checkpoint["state_dict"]`` fits ``module`` (what a strict
    ``load_state_dict`` checks: the same parameter names and shapes), so that a misfit is one line naming the
    checkpoint instead of torch's multi-line ``size mismatch`` / ``Missing key(s)`` traceback.

    Args:
        built_by: what built ``module``, for the message ("this run's model").
        model_cfg: the resolved ``model`` section that built ``module``; when given, the message names the
            model settings that differ from the checkpoint's stored ones, else the first misfit parameter.

    Raises:
        DiffSegError: when the weights do not fit.
    """
    weights, expected = checkpoint["state_dict"], module.state_dict()
    problem = next(
        (
            f"parameter {name} is {tuple(weights[name].shape)} in the checkpoint, {tuple(tensor.shape)} in the model"
            for name, tensor in expected.items()
            if name in weights and getattr(weights[name], "shape", None) != getattr(tensor, "shape", None)
        ),
        None,
    )
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    problem = (
        problem
        or (missing and f"the checkpoint has no parameter {missing[0]}")
        or (unexpected and f"the model has no parameter {unexpected[0]}")
    )
    if not problem:
        return
    path = getattr(checkpoint, "path", "(in memory)")
    stored = checkpoint.get("diffseg_config", {}).get("model")
    changed = [
        d
        for d in config_differences(stored, model_cfg, "model")
        if d[0].split(".")[1] not in NON_ARCHITECTURE_KEYS
    ]
    detail = describe_differences(changed) if model_cfg is not None and changed else problem
    raise DiffSegError(f"checkpoint {path} does not fit {built_by}: {detail}")
