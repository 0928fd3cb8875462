"""``hydra/launcher=slurm``: the submitit launcher config composes and yields the job parameters Lightning's
DDP expects (one task and one GPU per device, trainer.num_nodes nodes), without a cluster: the sweep is
launched up to submitit's ``map_array``, which is intercepted before ``sbatch`` would run (and submitit's
check for ``srun`` is answered yes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig

from diffseg_lightning.utils.compose import compose_config

pytest.importorskip(
    "hydra_plugins.hydra_submitit_launcher",
    reason="the [slurm] extra (hydra-submitit-launcher) is not installed: pip install -e '.[slurm]'",
)
submitit = pytest.importorskip("submitit", reason="submitit comes with the [slurm] extra")

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
DDP_4X2 = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]


def compose_with_hydra(overrides: list[str], tmp_path: Path) -> DictConfig:
    """Compose ``train`` with its ``hydra`` node as ``diffseg-train -m`` would, sweeping into tmp_path."""
    return compose_config(
        "train", [*overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path, return_hydra_config=True
    )


def test_slurm_launcher_config_matches_ddp(tmp_path):
    cfg = compose_with_hydra(DDP_4X2, tmp_path)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == SLURM_LAUNCHER
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.partition is None
    assert launcher.timeout_min > 0 and launcher.mem_gb > 0 and launcher.cpus_per_task >= 1
    assert Path(launcher.submitit_folder) == tmp_path / "sweep" / ".submitit" / "%j"

    # Other engines and overrides: CPU trainers ask for no GPUs, num_nodes defaults to 1, the rest is a flag.
    cpu = compose_with_hydra(
        ["hydra/launcher=slurm", "trainer=ddp_cpu", "hydra.launcher.partition=cpu"], tmp_path
    )
    assert (cpu.hydra.launcher.nodes, cpu.hydra.launcher.tasks_per_node) == (1, 2)
    assert cpu.hydra.launcher.gpus_per_node is None and cpu.hydra.launcher.partition == "cpu"


def test_all_gpus_is_rejected_with_a_clear_message(tmp_path):
    cfg = compose_with_hydra(["hydra/launcher=slurm", "trainer=ddp"], tmp_path)  # ddp's devices: -1
    with pytest.raises(Exception, match=r"trainer\.devices=8"):
        _ = cfg.hydra.launcher.tasks_per_node


def test_sweep_becomes_one_job_array_with_the_ddp_sbatch_lines(tmp_path, monkeypatch):
    cfg = compose_with_hydra([*DDP_4X2, "hydra.launcher.partition=gpu"], tmp_path)
    # The plugin's class, built as Hydra builds it; instantiating submits nothing.
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    launcher.setup(hydra_context=None, task_function=lambda _: None, config=cfg)

    submitted = {}

    def fake_map_array(executor, fn, *iterables):
        submitted.update(executor=executor, jobs=list(zip(*iterables, strict=True)))
        return []  # no jobs: launch() returns without waiting on a cluster

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", fake_map_array)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # "srun is there"
    assert launcher.launch([["seed=1"], ["seed=2"], ["seed=3"]], initial_job_idx=0) == []

    assert [job[0] for job in submitted["jobs"]] == [["seed=1"], ["seed=2"], ["seed=3"]]  # one array, 3 jobs
    executor = submitted["executor"]._executor
    assert Path(executor.folder) == tmp_path / "sweep" / ".submitit" / "%j"
    sbatch = executor._make_submission_file_text("python -m train", "uid")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        f"#SBATCH --time={cfg.hydra.launcher.timeout_min}",
        f"#SBATCH --cpus-per-task={cfg.hydra.launcher.cpus_per_task}",
        f"#SBATCH --mem={cfg.hydra.launcher.mem_gb}GB",
    ):
        assert line in sbatch, f"{line!r} missing from the sbatch script:\n{sbatch}"
