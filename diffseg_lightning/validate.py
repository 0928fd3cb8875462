"""Check a composed config before a run does anything: no data read, no network built, no file written.

:func:`validate_config` is the first thing every entry point does (``diffseg-train``, ``-eval``,
``-predict``, ``-check-data``, ``-synthesize``). A config that passes has

- no mandatory value left unset (``???``);
- output folders that can be written (``paths.output_dir``, ``output_dir``, ``data.cache_dir``);
- in every node with a ``_target_``, only keys that are parameters of the target (the signature, also
  for ``_partial_`` targets), each of a type its annotation accepts; for the ``data`` node the rule of
  :func:`data_keys` instead (its DataModule takes the dataset-level keys the split factories read);
- a noise kernel and a sampler that construct (their constructors check their own settings) and agree:
  a solver of that kernel, ``sampler.num_steps`` in ``[1, T]``, the evolution fusion only with a learned variance;
- trainer settings Lightning's ``Trainer`` accepts (it is constructed once, without callbacks or logger).

Every failure is a :class:`~diffseg_lightning.exceptions.ConfigError` that names the key.
"""

from __future__ import annotations

import collections.abc
import contextlib
import difflib
import enum
import inspect
import logging
import os
import re
import tempfile
import types
import typing
import warnings
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path, PurePath
from typing import Any, Literal, Union

from hydra._internal.utils import _locate
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffseg_lightning.diffusion.base import NoiseKernel
from diffseg_lightning.exceptions import ConfigError, DiffSegError
from diffseg_lightning.inference.sampler import DiffusionSampler
from diffseg_lightning.utils.moved_settings import MOVED_KEYS, moved_setting_message, with_stored_solver

__all__ = ["check_inference", "check_writable", "data_keys", "validate_config"]

#: Keys Hydra's ``instantiate`` reads itself.
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_args_", "_recursive_", "_convert_"})
#: Folders a run writes into, when its config has them.
OUTPUT_KEYS = ("paths.output_dir", "output_dir", "data.cache_dir")
_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence)
_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)
_DATA_REFERENCE = re.compile(r"(?<![\w.])data((?:\.[A-Za-z_]\w*)+)")


def validate_config(cfg: DictConfig, sampling: bool = True, unused: Collection[str] = ()) -> None:
    """Check ``cfg`` as a whole (see the module docstring); raise on the first class of problem found.

    Args:
        cfg: the composed config of an entry point (without the ``hydra`` node, as a task function gets it).
        sampling: also construct ``cfg.noise`` and ``cfg.sampler`` and check them together. False where the
            kernel comes from a checkpoint (``diffseg-synthesize``); :func:`check_inference` checks the
            sampler against it once the checkpoint is read (``diffseg-eval`` and ``-predict`` have no
            ``_target_`` in ``cfg.noise``, so nothing is constructed for them here anyway).
        unused: top-level nodes the entry point does not read (``diffseg-synthesize``: ``data``, whose
            ``root`` may be unset), left unchecked.

    Raises:
        ConfigError: naming the key and what it accepts (an interpolation that cannot be resolved, too).
    """
    with _config_errors():
        missing = [key for key in missing_keys(cfg) if key.split(".")[0].split("[")[0] not in unused]
        if missing:
            example = " ".join(f"{key}=..." for key in missing)
            raise ConfigError(
                f"missing value for {', '.join(missing)}: give it on the command line ({example})"
            )
        for key in cfg:
            if key not in unused and isinstance(cfg[key], DictConfig | ListConfig):
                OmegaConf.to_container(cfg[key], resolve=True)  # every interpolation resolves
        for key in OUTPUT_KEYS:
            folder = OmegaConf.select(cfg, key, default=None)
            if folder is not None:
                check_writable(folder, key)
        check_targets(cfg, unused)
        if sampling and _has_target(cfg.get("noise")) and _has_target(cfg.get("sampler")):
            check_sampling(cfg.noise, cfg.sampler)
        if _has_target(cfg.get("trainer")):
            check_trainer(cfg.trainer)


def check_inference(cfg: DictConfig, trained: Mapping[str, Any]) -> None:
    """Check ``cfg.sampler`` against the kernel of the checkpoint whose stored config is ``trained``: what
    ``diffseg-eval``, ``-predict`` and ``-synthesize`` sample with.

    The kernel is the trained one: a ``noise`` node on the command line of ``diffseg-eval`` / ``-predict``
    (``+noise.objective=x0``) is refused. The solver is the sampler's, or, for ``sampler.solver: null``, the
    one an old checkpoint stored in its kernel options (:func:`~diffseg_lightning.utils.moved_settings.with_stored_solver`).

    Raises:
        ConfigError: as :func:`check_sampling`, or a ``noise.<key>`` given for a checkpoint's kernel.
    """
    with _config_errors():
        given = cfg.get("noise")
        if isinstance(given, DictConfig) and not _has_target(given) and len(given):  # eval / predict
            key = str(next(iter(given)))
            if key in MOVED_KEYS:
                raise ConfigError(moved_setting_message(key, given[key]))
            raise ConfigError(
                f"noise.{key} cannot change at inference: the kernel is the checkpoint's, as it was trained "
                f"(the reverse update is the sampler's: sampler=ddim|ddpm|dpmpp_2m|bernoulli)"
            )
        if not _has_target(cfg.get("sampler")):
            return
        noise, sampler, _ = with_stored_solver(
            dict(trained["noise"]), OmegaConf.to_container(cfg.sampler, resolve=True)
        )
        check_sampling(OmegaConf.create(noise), OmegaConf.create(sampler), "the checkpoint's")


@contextlib.contextmanager
def _config_errors() -> Iterator[None]:
    """An OmegaConf error (an interpolation that does not resolve) as a one-line ConfigError naming the key."""
    try:
        yield
    except OmegaConfBaseException as err:  # e.g. ${data.num_phases} with a data config that has none
        where = getattr(err, "full_key", None)
        raise ConfigError(f"{f'{where}: ' if where else ''}{_first_line(err)}") from None


def missing_keys(cfg: DictConfig) -> list[str]:
    """The dotted paths of the values still ``???`` (not through interpolations, which OmegaConf's own
    ``missing_keys`` resolves and fails on)."""
    found: list[str] = []

    def scan(value: Any, path: str) -> None:
        if value == "???":
            found.append(path)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if not (path == "" and key == "hydra"):
                    scan(item, f"{path}.{key}" if path else str(key))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                scan(item, f"{path}[{i}]")

    scan(OmegaConf.to_container(cfg, resolve=False), "")
    return found


def check_writable(folder: str | os.PathLike, key: str) -> None:
    """Check that ``folder`` exists as a writable folder or can be created, without creating it.

    A temporary file is made (and removed at once) in the deepest folder that exists, so read-only file
    systems and permissions are seen as the run would see them (``os.access`` says yes to root everywhere).

    Raises:
        ConfigError: naming ``key``, the path and why it cannot be written.
    """
    existing = Path(folder).expanduser()
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "is" if existing == Path(folder).expanduser() else "lies under"
        raise ConfigError(
            f"{key}={folder} cannot be written: it {where} {existing}, which is a file, not a folder"
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=".diffseg-write-test-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(
            f"{key}={folder} cannot be written: {existing} is not writable ({err.strerror})"
        ) from None


# ----------------------------------------------------------------------------------------- keys and types
def check_targets(cfg: DictConfig, unused: Collection[str] = ()) -> None:
    """Check the keys and value types of every node with a ``_target_`` against the target's signature
    (except under the top-level nodes ``unused``)."""
    referenced = data_references(cfg)
    for path, node in target_nodes(cfg):
        if path.split(".")[0] not in unused:
            check_node(path, node, referenced if path == "data" else None)


def target_nodes(node: Any, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    """Every ``(dotted path, node)`` with a ``_target_`` under ``node`` (not through interpolations)."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        keys: list[Any] = [k for k in node.keys() if not (path == "" and k == "hydra")]
    elif isinstance(node, ListConfig):
        keys = list(range(len(node)))
    else:
        return
    for key in keys:
        child = node._get_node(key)
        if isinstance(child, DictConfig | ListConfig) and not (
            child._is_interpolation() or child._is_none() or child._is_missing()
        ):
            yield from target_nodes(child, f"{path}.{key}" if path else str(key))


def check_node(path: str, node: DictConfig, referenced: set[str] | None = None) -> None:
    """Check one ``_target_`` node: unknown keys, then the type of each value.

    Args:
        path: the node's dotted path (for the messages).
        node: the node.
        referenced: for the ``data`` node, the ``data.*`` paths the config's interpolations read
            (:func:`data_references`); its keys then follow :func:`data_keys`.
    """
    name = str(node._target_)
    try:
        target = _locate(name)
    except Exception as err:  # Hydra's lookup raises ImportError, AttributeError, ValueError
        raise ConfigError(f"{path}._target_: cannot import {name!r} ({' '.join(str(err).split())})") from None
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
        return
    named = {n: p for n, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    keys = [str(k) for k in node.keys() if k not in HYDRA_KEYS]
    if referenced is not None:
        valid = data_keys(node, named, referenced)
    elif any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        valid = set(keys)  # **kwargs: the target forwards what it does not name
    else:
        valid = set(named)
    unknown = [k for k in keys if k not in valid]
    if unknown:
        moved = _moved_solver_message(path, name, unknown[0], node[unknown[0]])
        raise ConfigError(moved or _unknown_message(path, name, unknown, valid))
    hints = _type_hints(target)
    for key in keys:
        if key in hints and key in named:
            _check_type(path, node, key, hints[key], named[key].default, name)


def data_keys(node: DictConfig, parameters: Mapping[str, Any], referenced: set[str]) -> set[str]:
    """The keys the ``data`` node may hold: the DataModule's parameters and the dataset-level keys (``root``,
    ``size``, ``year``, ...) that something reads, i.e. that an interpolation somewhere in the config names
    (``${data.size}`` in a split factory, ``${oc.select:data.crop,null}`` in a model). A key nothing reads
    would be silently ignored: a typo (``data.bacth_size``) or a setting of another dataset.
    """
    used = {
        str(key)
        for key in node.keys()
        if any(ref == f"data.{key}" or ref.startswith(f"data.{key}.") for ref in referenced)
    }
    return set(parameters) | used


def data_references(cfg: DictConfig) -> set[str]:
    """The ``data.<key>...`` paths named inside interpolations anywhere in ``cfg`` (unresolved)."""
    found: set[str] = set()

    def scan(value: Any) -> None:
        if isinstance(value, str):
            if "${" in value:
                found.update("data" + m.group(1) for m in _DATA_REFERENCE.finditer(value))
        elif isinstance(value, Mapping):
            for item in value.values():
                scan(item)
        elif isinstance(value, list):
            for item in value:
                scan(item)

    scan(OmegaConf.to_container(cfg, resolve=False))
    return found


def _moved_solver_message(path: str, target: str, key: str, value: Any) -> str | None:
    """Where an old solver option of a noise kernel went (``noise.sampling=ddpm`` is now ``sampler=ddpm``:
    :func:`~diffseg_lightning.utils.moved_settings.moved_setting_message`); None for any other unknown key."""
    kernel = path == "noise" or target.endswith(("GaussianKernel", "BernoulliKernel"))
    return moved_setting_message(key, value) if kernel and key in MOVED_KEYS else None


def _unknown_message(path: str, target: str, unknown: list[str], valid: set[str]) -> str:
    where = f"{path}." if path else ""
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1)
        parts.append(f"{where}{key}" + (f" (did you mean {where}{close[0]}?)" if close else ""))
    owner = "the data config" if path == "data" else target
    return (
        f"unknown setting {', '.join(parts)}: not a setting of {owner}; "
        f"valid settings of {path or 'the config'}: {', '.join(sorted(valid))}"
    )


def _type_hints(target: Any) -> dict[str, Any]:
    """The resolved annotations of a callable's parameters; {} when they cannot be evaluated."""
    function = target.__init__ if isinstance(target, type) else target
    try:
        return typing.get_type_hints(function)
    except Exception:  # a forward reference to a name only imported under TYPE_CHECKING, ...
        return {}


def _check_type(path: str, node: DictConfig, key: str, annotation: Any, default: Any, target: str) -> None:
    value = node[key]
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None and default is None:
        return
    if _matches(value, annotation) is False:
        source = f" (from {node._get_node(key)._value()})" if OmegaConf.is_interpolation(node, key) else ""
        raise ConfigError(
            f"{path}.{key}={value!r}{source}: {target.rsplit('.', 1)[-1]} expects {_describe(annotation)}"
        )


def _matches(value: Any, annotation: Any) -> bool | None:
    """Whether ``value`` (plain Python, from a config) fits ``annotation``: True, False, or None (cannot tell)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any or (isinstance(value, dict) and "_target_" in value):
        return None  # anything, or instantiated into an object of unknown type
    if origin in (Union, types.UnionType):
        results = [_matches(value, arg) for arg in args]
        return True if True in results else (None if None in results else False)
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation in _SEQUENCES or origin in _SEQUENCES:
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                return False
            results = [_matches(v, a) for v, a in zip(value, args, strict=True)]
        else:
            results = [_matches(v, args[0]) for v in value] if args else []
        return False if False in results else (None if None in results else True)
    if annotation in _MAPPINGS or origin in _MAPPINGS:
        return isinstance(value, dict)
    if isinstance(annotation, type):
        if annotation.__name__ == "Tensor":  # torch.Tensor beside a number (e.g. an optimiser's lr)
            return False if isinstance(value, str) else None
        if issubclass(annotation, PurePath):
            return isinstance(value, str)
        if isinstance(value, annotation):
            return True
        if issubclass(annotation, enum.Enum):
            return None  # the constructor parses the string and names the valid choices
    return None


def _describe(annotation: Any) -> str:
    """An annotation in words: ``Optional[int]`` -> ``int or null``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        literals = [a for arg in args if typing.get_origin(arg) is Literal for a in typing.get_args(arg)]
        words = [_describe(arg) for arg in args if typing.get_origin(arg) is not Literal]
        if literals:
            words.insert(0, f"one of {literals}")
        return " or ".join(dict.fromkeys(words))
    if origin is Literal:
        return f"one of {list(args)}"
    if annotation is type(None):
        return "null"
    if annotation in _SEQUENCES or origin in _SEQUENCES:
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
        return f"a list of {_describe(args[0])}" if args else "a list"
    if annotation in _MAPPINGS or origin in _MAPPINGS:
        return "a mapping"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# ------------------------------------------------------------------------------ kernel, sampler, trainer
def _has_target(node: Any) -> bool:
    return isinstance(node, DictConfig) and "_target_" in node


def _build(node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate(node)``, re-raising one of our errors from inside the target as itself."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, DiffSegError):
            raise err.__cause__ from None
        raise


def check_sampling(noise: DictConfig, sampler: DictConfig, whose: str | None = None) -> None:
    """Construct the kernel and the sampler, and check that they agree.

    Args:
        noise: the kernel's config.
        sampler: the sampler's config.
        whose: ``"the checkpoint's"`` when the kernel is the trained one (for the message).

    Raises:
        ConfigError: a solver that does not fit the kernel (``noise=bernoulli sampler=ddim``);
            ``sampler.num_steps`` outside ``[1, T]``; the evolution fusion without a learned variance; any
            check of the two constructors.
    """
    from diffseg_lightning.inference.fusion import Fusion, check_learned_variance

    kernel, recipe = _build(noise), _build(sampler)
    if not isinstance(kernel, NoiseKernel) or not isinstance(recipe, DiffusionSampler):
        return  # a user's own kernel or recipe class: its constructor has checked what it can
    recipe.resolve_solver(
        kernel
    )  # a solver of another kernel: ConfigError naming both and the sampler= to use
    steps, T = recipe.num_steps, kernel.num_train_timesteps
    if isinstance(steps, int) and steps > T:
        raise ConfigError(
            f"sampler.num_steps={steps} is more than T={T}, the diffusion steps the model is trained with "
            f"({f'{whose} ' if whose else ''}noise.num_train_timesteps): set sampler.num_steps to at most {T}"
        )
    try:
        kernel.inference_timesteps(steps)
    except ConfigError as err:
        raise ConfigError(f"sampler.num_steps: {err}") from None
    if Fusion.parse(recipe.fusion) is Fusion.EVOLUTION:
        check_learned_variance(kernel)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Lightning's info lines and warnings (the real Trainer prints them once, later)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def check_trainer(trainer: DictConfig) -> None:
    """Construct the ``Trainer`` once (no callbacks, no logger: ~10 ms, nothing written) so that Lightning's
    own checks (accelerator, devices, precision, strategy) fail before the run starts.

    Raises:
        ConfigError: what Lightning refused, prefixed with ``trainer:``.
    """
    try:
        with _quiet():
            _build(trainer, callbacks=[], logger=False)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, MisconfigurationException | ValueError | TypeError):
            raise ConfigError(f"trainer: {_first_line(cause)} (check the trainer.* settings)") from None
        raise
