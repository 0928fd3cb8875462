"""Compose a primary config in Python as the CLIs do, for experiment scripts and tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from diffseg_lightning.utils.resolvers import CONFIG_DIR

__all__ = ["compose_config"]


def compose_config(
    name: str,
    overrides: Sequence[str] = (),
    output_dir: str | Path | None = None,
    *,
    return_hydra_config: bool = False,
) -> DictConfig:
    """Compose the primary config ``name`` (``"train"``, ``"eval"``, ...) from the package's configs.

    The result is what ``diffseg-<name> <overrides>`` would run with, before Hydra resolves its run
    directory: ``hydra.*`` and ``paths.output_dir`` keep their interpolations unless ``output_dir`` is given.

    Args:
        name: the primary config's name, a file of ``diffseg_lightning/conf`` without ``.yaml``.
        overrides: command-line overrides (``["data=isic", "trainer.max_epochs=1"]``), applied in order.
        output_dir: when given, the run directory (``paths.output_dir``), appended after ``overrides``.
        return_hydra_config: keep the ``hydra`` node (run and sweep directories, launcher, sweeper), as a
            run sees it in ``HydraConfig``.

    Returns:
        The composed config.

    Raises:
        hydra.errors.MissingConfigException: ``name`` or an override's group option does not exist.
        ValueError: Hydra is already initialised in this process (inside a ``@hydra.main`` run).
    """
    extra = [] if output_dir is None else [f"paths.output_dir={output_dir}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(name, overrides=[*overrides, *extra], return_hydra_config=return_hydra_config)
