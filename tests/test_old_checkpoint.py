"""A checkpoint trained before the solvers were split off from the kernels (issue 19) still evaluates to its
metrics: its ``noise.sampling=dpmpp_2m`` is mapped to ``sampler=dpmpp_2m`` in the loader, with one warning.

``tests/fixtures/pre_redesign_dpmpp_2m.ckpt`` was trained on main 868561c with ``noise.sampling=dpmpp_2m
noise.num_train_timesteps=100`` (optimizer state stripped); ``pre_redesign_dpmpp_2m_eval.json`` holds what
``diffseg-eval ckpt_path=<it> sampler.num_steps=3 sampler.num_samples=2 trainer.accelerator=cpu`` gave there.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from diffseg_lightning import evaluate
from diffseg_lightning.utils.moved_settings import split_moved_settings, with_stored_solver

FIXTURES = Path(__file__).parent / "fixtures"
CKPT = FIXTURES / "pre_redesign_dpmpp_2m.ckpt"
EXPECTED = json.loads((FIXTURES / "pre_redesign_dpmpp_2m_eval.json").read_text())
EVAL = [f"ckpt_path={CKPT}", "sampler.num_steps=3", "sampler.num_samples=2", "trainer.accelerator=cpu"]
WARNING = (
    f"checkpoint {CKPT}: noise.sampling=dpmpp_2m noise.eta=0.0 noise.clip_x0=true is now sampler=dpmpp_2m "
    "(solver settings moved out of the noise kernel); using it"
)


@pytest.fixture
def two_threads():
    """The fixture's metrics were computed with torch's 2 intra-op threads (a 2-core machine); the float32
    sums inside the convolutions run in an order that depends on the thread count (1 thread moves a case's
    AUROC by 6e-6 through near-tied pixels), so the test runs with the same count."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def run_eval(cli, tmp_path: Path, *extra: str) -> tuple[dict, list[str]]:
    """``diffseg-eval`` in this process: its summary.json and the warnings it emitted."""
    out = tmp_path / "eval"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = cli(evaluate.main, *EVAL, *extra, f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((out / "summary.json").read_text()), [str(w.message) for w in caught]


def test_the_pre_redesign_checkpoint_evaluates_to_its_metrics_with_one_deprecation_warning(
    cli, tmp_path, two_threads
):
    summary, messages = run_eval(cli, tmp_path)
    assert [m for m in messages if "solver settings moved" in m] == [WARNING]
    assert summary["sampler"]["update"] == "dpmpp_2m" and summary["sampler"]["deterministic"] is True
    rows, expected = summary["metric_per_case"], EXPECTED["metric_per_case"]
    assert [r["case"] for r in rows] == [e["case"] for e in expected]
    for row, want in zip(rows, expected, strict=True):
        for key, value in want.items():
            if isinstance(value, float):
                # the same float32 code path, thread count and CPU: the samples are bitwise those of
                # 868561c, so the metrics agree to the last digit (measured: exactly); 1e-6 relative only
                # absorbs a summation order inside a metric library, far below any metric's resolution
                # (1 pixel of a 32x32 mask moves the Dice by ~1e-3)
                assert row[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (row["case"], key)
            else:
                assert row[key] == value, (row["case"], key)


def test_a_sampler_on_the_command_line_wins_over_the_stored_solver(cli, tmp_path):
    summary, messages = run_eval(cli, tmp_path, "sampler=ddim")
    assert not [m for m in messages if "solver settings moved" in m]
    assert summary["sampler"]["update"] == "ddim"
    dice = [r["dice"] for r in summary["metric_per_case"]]
    assert dice != [e["dice"] for e in EXPECTED["metric_per_case"]], "DDIM must differ: the mapping is used"


def test_the_mapping_of_the_old_kernel_options():
    old = {"_target_": "diffseg_lightning.diffusion.GaussianKernel", "objective": "x0", "sampling": "ddim"}
    moved = split_moved_settings({**old, "eta": 1.0, "clip_x0": False})
    assert moved.noise == {"_target_": "diffseg_lightning.diffusion.GaussianKernel", "objective": "x0"}
    assert moved.solver == {
        "_target_": "diffseg_lightning.diffusion.solvers.DDIM",
        "eta": 1.0,
        "clip_x0": False,
    }
    assert moved.new == "sampler=ddim sampler.solver.eta=1.0 sampler.solver.clip_x0=false"
    ddpm = split_moved_settings({**old, "sampling": "ddpm", "eta": 0.5})  # DDPM ignored eta then too
    assert ddpm.solver == {"_target_": "diffseg_lightning.diffusion.solvers.DDPM", "clip_x0": True}
    bernoulli = split_moved_settings(
        {"_target_": "diffseg_lightning.diffusion.BernoulliKernel", "binarize_final": True}
    )
    assert bernoulli.new == "sampler=bernoulli sampler.solver.binarize_final=true"
    new = split_moved_settings({"_target_": "diffseg_lightning.diffusion.GaussianKernel", "objective": "x0"})
    assert new.solver is None  # a checkpoint of today: nothing to map
    sampler = {"_target_": "diffseg_lightning.inference.DiffusionSampler", "solver": None}
    assert with_stored_solver({**old, "sampling": "ddpm"}, sampler)[1]["solver"]["_target_"].endswith("DDPM")
    chosen = {**sampler, "solver": {"_target_": "diffseg_lightning.diffusion.solvers.DDIM"}}
    assert with_stored_solver({**old, "sampling": "ddpm"}, chosen)[1:] == (chosen, None)
