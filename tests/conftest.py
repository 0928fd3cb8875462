"""Shared fixtures: the tiny-run overrides, CLI runners and a tiny trained checkpoint.

``compose_config`` is :func:`diffseg_lightning.utils.compose.compose_config`, re-exported for the tests.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from diffseg_lightning.utils.compose import compose_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DIFFSEG_SHARED_DATA", REPO.parent / "shared" / "data"))  # the real subsets

# Settings that keep a run to seconds on 2 CPU cores; the method and code paths are the real ones.
TINY_MODEL = [
    "data.size=32",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "model.denoiser.base_channels=8",
    "model.denoiser.channel_mults=[1,2]",
    "model.denoiser.attention_levels=[false,true]",
    "sampler.num_steps=2",
    "sampler.num_samples=2",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "~callbacks.progress_bar",
]
TINY = [*TINY_MODEL, "data.num_train=32", "data.num_val=8", "data.num_test=8"]  # for data=synthetic


def run_cli(script: str, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a console script (``diffseg-train`` ...) in ``cwd`` and capture its output."""
    exe = Path(sys.executable).parent / script
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


class CliResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(monkeypatch, capsys) -> Callable[..., CliResult]:
    """Run a console script's ``main`` (e.g. ``diffseg_lightning.train.main``) in this process, as the shell
    runs it in ``cwd``: its exit code (``SystemExit``; 0 when it returns) and what it printed. Seconds
    faster than a new process (no imports); any other exception escapes, as its traceback would."""

    def run(main: Callable[[], None], *args: str, cwd: Path) -> CliResult:
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", [main.__module__, *args])
        for name, value in {"HYDRA_FULL_ERROR": "1", "WANDB_MODE": "offline"}.items():
            monkeypatch.setenv(name, value)  # run_cli sets HYDRA_FULL_ERROR; restored after the test
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        finally:  # Hydra configured logging for the run (a console handler on the captured stdout, a file)
            for handler in [h for h in root.handlers if h not in handlers]:
                handler.close()
            root.handlers[:] = handlers
            root.setLevel(level)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


@pytest.fixture(autouse=True)
def no_leaked_global_seed():
    """``seed_everything`` (run by in-process train / eval / predict) leaves ``PL_GLOBAL_SEED`` in the
    environment, and the training order (``SegmentationDataModule.epoch_sampler``) reads it: remove it after
    each test, so no test's data order depends on which tests ran before it."""
    yield
    os.environ.pop("PL_GLOBAL_SEED", None)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small-tensor tests: on a busy 2-core runner, OpenMP made
    16k-element exp/sqrt take ~15 ms (measured), and small ops gain nothing from threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A tiny model trained for one epoch in-process; returns its run directory (with checkpoints/)."""
    from diffseg_lightning.train import train

    out = tmp_path_factory.mktemp("trained")
    train(compose_config("train", TINY, out))
    return out


def shared_data(name: str) -> Path:
    """The real data subset ``../shared/data/<name>``, or skip with the reason when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(
            f"real data subset {path} is absent (it lives outside the repository; set DIFFSEG_SHARED_DATA)"
        )
    return path


def assert_close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Like torch.testing.assert_close (NaN == NaN), without its ~1 s of lazy imports on first use."""
    expected = expected.to(actual.dtype)
    ok = actual.shape == expected.shape and torch.allclose(
        actual, expected, rtol=1e-5, atol=1e-6, equal_nan=True
    )
    assert ok, f"{msg}: {actual} != {expected}"
