"""The kernel options that became solver options (issue 19): reading old checkpoints, and the hint for old
command lines.

Before the solvers were split off, the Gaussian kernel took ``sampling`` (``ddim | ddpm | dpmpp_2m``), ``eta``
and ``clip_x0``, and the Bernoulli kernel ``binarize_final``; a checkpoint of that time stores them in its
``noise`` config. :func:`split_moved_settings` takes them out (the kernels no longer accept them) and says
which solver they meant, so the checkpoint samples as it did; :func:`moved_setting_message` is the error
text for ``noise.sampling=...`` on a new command line. Plain dicts in, plain dicts out (no Hydra).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from diffseg_lightning.exceptions import ConfigError

__all__ = [
    "MOVED_KEYS",
    "MovedSettings",
    "moved_setting_message",
    "split_moved_settings",
    "with_stored_solver",
]

#: The ``noise.<key>`` settings that are solver options now.
MOVED_KEYS: tuple[str, ...] = ("sampling", "eta", "clip_x0", "binarize_final")

_SOLVERS = "diffseg_lightning.diffusion.solvers"
#: ``sampler=<group>`` -> (solver class, its options with their defaults, as in ``conf/sampler/<group>.yaml``).
_GROUPS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": (f"{_SOLVERS}.DDIM", {"eta": 0.0, "clip_x0": True}),
    "ddpm": (f"{_SOLVERS}.DDPM", {"clip_x0": True}),
    "dpmpp_2m": (f"{_SOLVERS}.DPMSolverPP2M", {"clip_x0": True}),
    "bernoulli": (f"{_SOLVERS}.BernoulliPosterior", {"binarize_final": False}),
}


class MovedSettings(NamedTuple):
    """What :func:`split_moved_settings` found in a stored ``noise`` config."""

    #: the ``noise`` config without the moved keys (what the kernel takes now)
    noise: dict[str, Any]
    #: the solver config they select (``{"_target_": ..., options}``); None when the config had none of them
    solver: dict[str, Any] | None
    #: the moved settings as they were written, e.g. ``"noise.sampling=dpmpp_2m noise.eta=0.0"``
    old: str
    #: the same choice on today's command line, e.g. ``"sampler=dpmpp_2m"``
    new: str


def _word(value: Any) -> str:
    """A value as it is typed on a Hydra command line (``true``, ``0.5``, ``ddim``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def split_moved_settings(noise: Mapping[str, Any]) -> MovedSettings:
    """Take the old solver keys (:data:`MOVED_KEYS`) out of a stored ``noise`` config and name the solver.

    The Gaussian kernel's ``sampling`` selects ``DDIM(eta, clip_x0)``, ``DDPM(clip_x0)`` or
    ``DPMSolverPP2M(clip_x0)`` (DDPM and DPM-Solver++ ignored ``eta`` then too); the Bernoulli kernel's
    ``binarize_final`` selects ``BernoulliPosterior(binarize_final)``. A missing key takes its old default
    (``ddim``, 0, true; false).

    Args:
        noise: a ``noise`` config (``_target_`` and the kernel's arguments), e.g. a checkpoint's.

    Returns:
        :class:`MovedSettings`; ``solver`` is None (and ``old``, ``new`` empty) when none of the keys is there.
    """
    kept = {k: v for k, v in noise.items() if k not in MOVED_KEYS}
    moved = {k: noise[k] for k in MOVED_KEYS if k in noise}
    if not moved:
        return MovedSettings(kept, None, "", "")
    if str(noise.get("_target_", "")).endswith("BernoulliKernel"):
        group, given = "bernoulli", {"binarize_final": bool(moved.get("binarize_final", False))}
    else:
        group = str(moved.get("sampling", "ddim"))
        if group not in ("ddim", "ddpm", "dpmpp_2m"):
            raise ConfigError(
                f"noise.sampling={group}: not a reverse update of the Gaussian kernel; valid values are "
                "['ddim', 'ddpm', 'dpmpp_2m']"
            )
        given = {"clip_x0": bool(moved.get("clip_x0", True))}
        if group == "ddim":
            given = {"eta": float(moved.get("eta", 0.0)), **given}
    target, defaults = _GROUPS[group]
    changed = " ".join(f"sampler.solver.{k}={_word(v)}" for k, v in given.items() if v != defaults[k])
    return MovedSettings(
        kept,
        {"_target_": target, **given},
        " ".join(f"noise.{k}={_word(v)}" for k, v in moved.items()),
        f"sampler={group}" + (f" {changed}" if changed else ""),
    )


def with_stored_solver(
    noise: Mapping[str, Any], sampler: Mapping[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any] | None, MovedSettings | None]:
    """A checkpoint's ``noise`` config as the kernel takes it now, and the ``sampler`` config to sample it with.

    The solver the checkpoint stored in its kernel options (:func:`split_moved_settings`) is used when
    ``sampler`` is a sampler config (it has a ``_target_``) whose ``solver`` is null or absent; a solver on
    the command line (``sampler=ddpm``) wins.

    Args:
        noise: the checkpoint's ``noise`` config.
        sampler: this run's ``sampler`` config, or None.

    Returns:
        ``(noise, sampler, moved)``: the kernel config without the moved keys, the sampler config (with the
        stored solver when it is used), and the :class:`MovedSettings` when the stored solver is used
        (to warn about), else None.
    """
    moved = split_moved_settings(noise)
    plain = dict(sampler) if sampler is not None else None
    if moved.solver is None or plain is None or "_target_" not in plain or plain.get("solver") is not None:
        return moved.noise, plain, None
    return moved.noise, {**plain, "solver": moved.solver}, moved


def moved_setting_message(key: str, value: Any) -> str:
    """The error for ``noise.<key>=<value>`` (a key of :data:`MOVED_KEYS`) on a command line: where it went.

    Args:
        key: ``sampling``, ``eta``, ``clip_x0`` or ``binarize_final``.
        value: the value given.
    """
    given = f"noise.{key}={_word(value)} is no longer a noise setting (solver settings moved out of the noise kernel)"
    if key == "sampling":
        group = str(value) if str(value) in _GROUPS else "<name>"
        return (
            f"{given}: choose the reverse update with sampler={group} (sampler=ddim|ddpm|dpmpp_2m for "
            f"noise=gaussian, sampler=bernoulli for noise=bernoulli, sampler=default for the kernel's default)"
        )
    if key == "eta":
        return f"{given}: it is DDIM's, set it with sampler=ddim sampler.solver.eta={_word(value)}"
    if key == "binarize_final":
        return f"{given}: set it with sampler=bernoulli sampler.solver.binarize_final={_word(value)}"
    return f"{given}: set it with sampler=ddim|ddpm|dpmpp_2m sampler.solver.{key}={_word(value)}"
