"""The package works installed, not only from a source checkout: a wheel built from this tree holds every
module and config, and its ``diffseg-train`` trains from an empty folder in a fresh venv.

Offline and fast: the wheel is built with this interpreter's setuptools (``--no-build-isolation``, nothing
downloaded), in a copy of the tree so the checkout gets no ``build/`` or ``*.egg-info``; the fresh venv has
no pip of its own (this interpreter's pip installs into it) and finds the dependencies (torch, Lightning,
...) in this environment's site-packages through a ``.pth`` line. A ``.pth`` line only appends a folder to
``sys.path`` (the ``.pth`` files inside it are not run), so the editable install of the checkout, which is
such a file, does not reach the fresh venv; the test checks the package imports from the venv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY

PACKAGE = REPO / "diffseg_lightning"


def run(*args: str | Path, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command with an environment that points at nothing of the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PROJECT_ROOT", "DIFFSEG_LOG_DIR")}
    env.update(WANDB_MODE="offline", PYTHONWARNINGS="ignore", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def build_litter() -> dict[str, int]:
    """What a build in the checkout would leave: ``build/`` and ``*.egg-info`` (name -> mtime)."""
    found = [*REPO.glob("build"), *REPO.glob("*.egg-info"), *PACKAGE.glob("*.egg-info")]
    return {str(p.relative_to(REPO)): p.stat().st_mtime_ns for p in found}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel of the working tree (committed or not), built in a copy of it."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(PACKAGE, source / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    before = build_litter()
    result = run(
        sys.executable,
        *("-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir"),
        *("-q", "-w", work / "dist", source),
        cwd=work,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert build_litter() == before, "building the wheel left build/ or *.egg-info in the checkout"
    (built,) = (work / "dist").glob("diffseg_lightning-*.whl")
    return built


def test_the_wheel_holds_every_module_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tree = {
        path.relative_to(REPO).as_posix()
        for path in PACKAGE.rglob("*")
        if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts
    }
    configs = {name for name in tree if name.startswith("diffseg_lightning/conf/")}
    assert len(configs) > 50 and all(name.endswith(".yaml") for name in configs)
    assert "diffseg_lightning/conf/train.yaml" in names
    # a folder without __init__.py is no package to setuptools' find: its modules would be missing here
    assert sorted(tree - names) == []
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "diffseg-train = diffseg_lightning.train:main" in scripts


def test_the_installed_wheel_trains_from_an_empty_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    result = run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    python = venv / "bin" / "python"
    site = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).stdout.strip()
    )
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))  # the dependencies
    (site / "_diffseg_test_dependencies.pth").write_text("".join(f"{path}\n" for path in ours))
    result = run(
        sys.executable,
        *("-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--no-cache-dir", "-q"),
        wheel,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    empty = tmp_path / "anywhere"
    empty.mkdir()
    where = run(
        python,
        "-c",
        "import diffseg_lightning, diffseg_lightning.utils as u; print(diffseg_lightning.__file__); "
        "print(u.CONFIG_DIR)",
        cwd=empty,
    )
    assert where.returncode == 0, where.stderr[-3000:]
    module, config_dir = (Path(line).resolve() for line in where.stdout.split())
    assert module.is_relative_to(site.resolve()), f"{module} is not the installed copy in {site}"
    assert config_dir == module.parent / "conf" and (config_dir / "train.yaml").is_file()

    result = run(venv / "bin" / "diffseg-train", "debug=fast_dev_run", *TINY, cwd=empty)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (run_dir,) = (empty / "outputs" / "train" / "runs").iterdir()  # paths.log_dir's default, in the cwd
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 1  # fast_dev_run: one optimiser step on one training batch
    summary = json.loads((run_dir / "summary.json").read_text())  # and the test batch was scored
    assert summary["num_cases"] >= 1 and 0.0 <= summary["mean"]["dice"] <= 1.0, summary["mean"]
    assert sorted(p.name for p in empty.iterdir()) == ["outputs"]
