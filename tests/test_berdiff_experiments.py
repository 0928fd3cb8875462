"""BerDiff's paper-setting experiments (LIDC and BraTS, each with Bernoulli and Gaussian noise) run end to end
under fast_dev_run, in one process and on two DDP processes, on replicas of the official layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from test_data_brats import write_brats
from test_data_lidc import dump, pickle_slices

# The paper's image sizes and networks; small batches keep one fast_dev_run step short on 2 CPU cores.
FAST = [
    "debug=fast_dev_run",
    "logger=csv",
    "paths.log_dir=logs",
    "data.batch_size=2",
    "data.eval_batch_size=1",
]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("replicas")
    lidc = dump(root / "lidc" / "data_lidc.pickle", pickle_slices(series=8, per_series=2))
    write_brats(
        root / "brats", "2021", cases=10, shape=(240, 240, 6)
    )  # 240 x 240 slices: the crop to 224 is real
    return {"lidc": lidc, "brats": root / "brats"}


def summaries(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("[0-9]*/summary.json"))]


@pytest.mark.parametrize("dataset", ["lidc", "brats"])
def test_both_kernels_run_in_the_paper_setting(dataset, replicas, tmp_path):
    result = run_cli(
        "diffseg-train",
        "-m",
        f"experiment=berdiff_{dataset},berdiff_{dataset}_gaussian",
        f"data={dataset}",  # the sweep's base config (composed without the sweep) must know data.root too
        f"data.root={replicas[dataset]}",
        *FAST,
        "hydra.sweep.dir=logs/sweep",
        cwd=tmp_path,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "logs" / "sweep").glob("[0-9]*"))
    assert len(runs) == 2
    kernels = []
    for run in runs:
        config = (run / "config.yaml").read_text()
        kernels.append("BernoulliKernel" if "BernoulliKernel" in config else "GaussianKernel")
        summary = json.loads((run / "summary.json").read_text())
        case = summary["metric_per_case"][0]
        if dataset == "lidc":  # 4 annotators: the multi-annotator metrics are reported
            assert {"ged", "hm_iou", "soft_dice"} <= set(case)
        else:
            assert Path(case["case"].split("#")[0]).name.startswith("BraTS2021_")
    assert kernels == ["BernoulliKernel", "GaussianKernel"]


@pytest.mark.ddp
@pytest.mark.parametrize("dataset", ["lidc", "brats"])
def test_experiment_runs_on_two_cpu_processes(dataset, replicas, tmp_path):
    result = run_cli(
        "diffseg-train",
        f"experiment=berdiff_{dataset}",
        f"data.root={replicas[dataset]}",
        "trainer=ddp_cpu",
        *FAST,
        cwd=tmp_path,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs
    assert (runs[0] / "summary.json").is_file() and (runs[0] / "splits.json").is_file()
