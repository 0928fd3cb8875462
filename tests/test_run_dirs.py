"""Every run gets its own directory: two runs started in the same second never share one, a sweep's jobs are
numbered inside their own sweep directory, and the name is fixed for the whole run (DDP workers, sweep jobs)."""

from __future__ import annotations

import json
import pickle
from datetime import datetime
from pathlib import Path

import hydra
import hydra.core.utils
import pytest
import yaml
from conftest import TINY, compose_config
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffseg_lightning import train as train_cli
from diffseg_lightning.utils import CONFIG_DIR, resolvers
from diffseg_lightning.utils.resolvers import run_name


class FrozenClock(datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2025, 1, 31, 12, 0, 0)


@pytest.fixture
def same_second(monkeypatch):
    """Every run starts at 2025-01-31 12:00:00: Hydra's ``now`` and ours read the frozen clock."""
    monkeypatch.setattr(hydra.core.utils, "datetime", FrozenClock)
    monkeypatch.setattr(resolvers, "datetime", FrozenClock, raising=False)


def test_two_training_runs_in_the_same_second_keep_their_own_files(cli, same_second, tmp_path):
    for seed in (1, 2):
        overrides = [*TINY, "debug=fast_dev_run", f"seed={seed}", "paths.log_dir=logs"]
        assert cli(train_cli.main, *overrides, cwd=tmp_path).returncode == 0
    runs = sorted((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 2, runs
    assert all(run.name.startswith("2025-01-31_12-00-00_") for run in runs)
    seeds = set()
    for run in runs:
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert f"seed={config['seed']}" in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        assert config["paths"]["output_dir"] == str(run.resolve())
        assert (run / "splits.json").is_file() and json.loads((run / "summary.json").read_text())["mean"]
        seeds.add(config["seed"])
    assert seeds == {1, 2}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def record(cfg: DictConfig) -> None:
    """A Hydra app on diffseg-predict's config (our hydra/default.yaml: run and sweep directories) whose job
    writes what it sees into its own output directory."""
    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    # What Lightning's DDP launcher hands its workers (hydra.run.dir) must be this run's directory.
    run_dir = Path(hydra_cfg.run.dir).resolve() if hydra_cfg.mode.name == "RUN" else None
    (out / "job.json").write_text(json.dumps({"seed": cfg.seed, "run_dir": str(run_dir)}))


def test_runs_and_sweeps_in_the_same_second_get_their_own_directories(cli, same_second, tmp_path):
    for args in (["seed=1"], ["seed=2"], ["-m", "seed=3,4"], ["-m", "seed=5,6"]):
        assert cli(record, *args, "paths.log_dir=logs", cwd=tmp_path).returncode == 0
    runs = sorted((tmp_path / "logs" / "predict" / "runs").iterdir())
    assert len(runs) == 2
    jobs = [json.loads((run / "job.json").read_text()) for run in runs]
    assert sorted(job["seed"] for job in jobs) == [1, 2]
    assert [job["run_dir"] for job in jobs] == [str(run.resolve()) for run in runs]
    sweeps = sorted((tmp_path / "logs" / "predict" / "multiruns").iterdir())
    assert len(sweeps) == 2
    seeds = [sorted(json.loads((s / n / "job.json").read_text())["seed"] for n in ("0", "1")) for s in sweeps]
    assert sorted(seeds) == [[3, 4], [5, 6]]  # each sweep's jobs, numbered 0 and 1, in one sweep directory


def test_the_name_is_fixed_for_the_whole_run():
    """Read again, copied, or pickled (as the SLURM launcher ships a job's config), a run's directory stays."""
    cfg, other = (compose_config("train", return_hydra_config=True) for _ in range(2))
    run_dir, sweep_dir = cfg.hydra.run.dir, cfg.hydra.sweep.dir
    assert cfg.hydra.run.dir == run_dir and run_dir != other.hydra.run.dir
    assert Path(run_dir).name == Path(sweep_dir).name
    copy = pickle.loads(pickle.dumps(cfg))
    assert copy.hydra.run.dir == run_dir and copy.hydra.sweep.dir == sweep_dir


def test_run_names_are_unique_within_one_second(same_second, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    names = [run_name() for _ in range(1000)]  # one process, one second: the random part never repeats
    assert len(set(names)) == len(names)
    assert all(name.startswith("2025-01-31_12-00-00_") for name in names)


def test_torchrun_processes_share_their_rendezvous_id(monkeypatch):
    """Each process torchrun starts composes the config itself: they share the name of their run."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "f00d")
    assert run_name() == run_name() == "torchrun-f00d"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun without --rdzv-id: no shared id
    assert run_name() != run_name()
