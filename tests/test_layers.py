"""The package's layers hold: no module imports from a layer above its own (read from the source with ``ast``,
so an import inside a function or under ``TYPE_CHECKING`` counts too), and scripts and tests compose configs
with the one helper, :func:`diffseg_lightning.utils.compose.compose_config`.

The layers, low to high (a module may import its own layer and the ones below):

0. ``exceptions``, ``utils``: errors, config resolvers and composition, maths with no layer of its own
   (box geometry, HoVer maps, LR schedules), file writing.
1. ``io``: reading images and volumes.
2. ``data``, ``diffusion`` (kernels, solvers, the reverse loop), ``nets``, ``features`` (a frozen backbone
   as a representation), ``metrics``, ``losses``.
3. ``inference``: multi-sample sampling, fusion, uncertainty.
4. ``methods``: the LightningModules.
5. ``callbacks``, ``checkpointing``.
6. the entry points: ``entry``, ``train``, ``evaluate``, ``predict``, ``check_data``, ``synthesize``, and
   ``validate`` (the config check they run first).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO, compose_config

PACKAGE = REPO / "diffseg_lightning"

#: Each top-level part of the package (a subpackage or a module beside them) and its layer.
LAYER = {
    "exceptions": 0,
    "utils": 0,
    "io": 1,
    "data": 2,
    "diffusion": 2,
    "nets": 2,
    "features": 2,
    "metrics": 2,
    "losses": 2,
    "inference": 3,
    "methods": 4,
    "callbacks": 5,
    "checkpointing": 5,
    "entry": 6,
    "train": 6,
    "evaluate": 6,
    "predict": 6,
    "check_data": 6,
    "synthesize": 6,
    "validate": 6,  # the CLIs' whole-config check: it builds kernels, samplers and fusions to check them
    "__init__": 7,  # the package's own __init__ (imports nothing today)
}

#: Parts of one layer that never import each other, and the reason.
APART = {
    ("nets", "diffusion"): "a denoiser knows nothing of the noise process (docs: the two contracts)",
    ("diffusion", "nets"): "a kernel knows nothing about the network",
    ("methods", "data"): "a method gets its batches from the data module; what both use lives lower",
}

#: Imports allowed against the table, each with its reason (none today).
ALLOWED: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part(module: str) -> str:
    """``diffseg_lightning.methods.base`` -> ``methods``; the package itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every ``diffseg_lightning`` module that ``path`` imports, anywhere in it, with the line."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from diffseg_lightning import utils` imports the subpackage utils
            names = [f"{base}.{a.name}" for a in node.names] if base == "diffseg_lightning" else [base]
            found += [(node.lineno, name) for name in names]
    return [(line, name) for line, name in found if name.split(".")[0] == "diffseg_lightning"]


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_part_of_the_package_has_a_layer():
    parts = {part(module_name(path)) for path in package_files()}
    assert sorted(parts - LAYER.keys()) == [], "add the new part to LAYER in tests/test_layers.py"


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for path in package_files():
        source = part(module_name(path))
        for line, name in imported_modules(path):
            target = part(name)
            if target not in LAYER or source not in LAYER or (source, target) in ALLOWED:
                continue  # an unknown part fails the test above
            where = f"{path.relative_to(REPO)}:{line} imports {name}"
            if LAYER[target] > LAYER[source]:
                upward.append(f"{where} (layer {LAYER[target]} > {LAYER[source]})")
            elif (source, target) in APART:
                upward.append(f"{where} ({APART[source, target]})")
    assert upward == [], "\n".join(upward)


def test_the_checker_sees_imports_in_functions_relative_and_under_type_checking(tmp_path, monkeypatch):
    """The parser is the test: a lazy, a relative and a ``TYPE_CHECKING`` import are all imports."""
    fake = tmp_path / "diffseg_lightning" / "nets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "x.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from ..utils import boxes\n"
        "from diffseg_lightning import io\n"
        "if TYPE_CHECKING:\n    from diffseg_lightning.diffusion.base import NoiseKernel\n"
        "def f():\n    import diffseg_lightning.methods.base\n"
    )
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    assert imported_modules(fake / "x.py") == [
        (2, "diffseg_lightning.utils"),
        (3, "diffseg_lightning.io"),
        (5, "diffseg_lightning.diffusion.base"),
        (7, "diffseg_lightning.methods.base"),
    ]


# ------------------------------------------------------------------------------------ one compose helper
def python_files(*folders: str) -> list[Path]:
    return sorted(
        p for folder in folders for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts
    )


def test_experiments_import_nothing_from_the_tests():
    offenders = []
    for path in python_files("experiments"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [
                f"{path.relative_to(REPO)}:{node.lineno} imports {name}"
                for name in names
                if name.split(".")[0] in ("conftest", "tests")
            ]
    assert offenders == [], "\n".join(offenders)


def test_configs_are_composed_in_one_place():
    """Hydra's compose API appears only in ``utils/compose.py``: scripts and tests call compose_config."""
    users = [
        str(path.relative_to(REPO))
        for path in python_files("diffseg_lightning", "experiments", "tests")
        if path.name != "test_layers.py" and "initialize_config_dir" in path.read_text()
    ]
    assert users == ["diffseg_lightning/utils/compose.py"]


@pytest.mark.parametrize("output_dir", [None, "runs/here"])
def test_compose_config_applies_the_overrides_and_the_run_directory(output_dir):
    cfg = compose_config("train", ["data.size=48", "trainer.max_epochs=3"], output_dir)
    assert (cfg.data.size, cfg.trainer.max_epochs) == (48, 3)
    if output_dir is None:  # left to Hydra's run directory
        assert cfg.paths._get_node("output_dir")._value() == "${hydra:runtime.output_dir}"
    else:
        assert cfg.paths.output_dir == output_dir
