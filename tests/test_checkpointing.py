"""``last.ckpt`` is the latest state (every N steps, every epoch end and validation, SIGINT / SIGTERM), written
atomically, and resuming from it, even mid-epoch and after SIGKILL, gives exactly the uninterrupted run.
Resuming or predicting with a checkpoint that does not fit is one line naming the setting."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, TINY, compose_config

from diffseg_lightning.checkpointing import AtomicCheckpointIO, LastCheckpoint
from diffseg_lightning.entry import load_checkpoint, module_from_checkpoint
from diffseg_lightning.exceptions import ConfigError, DiffSegError
from diffseg_lightning.train import train

# 24 training items in batches of 8: 3 optimiser steps per epoch, 6 in all; last.ckpt also every 2 steps.
RUN = [
    *TINY,
    "data.num_train=24",
    "test=false",
    "trainer.max_epochs=2",
    "callbacks.last_checkpoint.every_n_train_steps=2",
]
TESTS = Path(__file__).resolve().parent


class SignalAt(L.Callback):
    """Sends ``signum`` to this process in the middle of the training step taken at ``global_step == step``
    (after backward, before the optimiser step), or with ``phase="validation"`` at the first batch of the
    validation that runs at that global step."""

    def __init__(self, step: int, signum: int, phase: str = "train") -> None:
        self.step, self.signum, self.phase = step, signum, phase

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.phase == "train" and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.phase == "validation" and trainer.global_step == self.step and batch_idx == 0:
            os.kill(os.getpid(), self.signum)


class LastSeen(L.Callback):
    """Records, at the start of every training step, the global step held by ``last.ckpt`` (None: no file)
    and the trainer's CheckpointIO, into the JSON file ``record``."""

    def __init__(self, record: str) -> None:
        self.record, self.steps, self.io = Path(record), [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        self.steps.append(torch.load(last, weights_only=False)["global_step"] if last.is_file() else None)
        self.io = type(trainer.strategy.checkpoint_io).__name__
        self.record.write_text(json.dumps({"steps": self.steps, "io": self.io}))


def signal_at(step: int, signum: int, phase: str = "train") -> list[str]:
    name = f"{SignalAt.__module__}.SignalAt"
    return [
        f"+callbacks.signal_at._target_={name}",
        f"+callbacks.signal_at.step={step}",
        f"+callbacks.signal_at.signum={int(signum)}",
        f"+callbacks.signal_at.phase={phase}",
    ]


def last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def resume(interrupted: Path, out: Path) -> dict:
    train(compose_config("train", [*RUN, f"ckpt_path={interrupted / 'checkpoints' / 'last.ckpt'}"], out))
    return last(out)


def assert_same_state(a: dict, b: dict) -> None:
    """Bit-identical weights (EMA and raw), Adam moments and global step: resume must replay the same
    arithmetic in the same order, so no tolerance applies."""
    assert a["global_step"] == b["global_step"]
    for key in ("state_dict", "current_model_state"):  # EMA weights and raw weights
        assert a[key].keys() == b[key].keys()
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    adam_a, adam_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for index, state in adam_a.items():
        assert torch.equal(state["exp_avg"], adam_b[index]["exp_avg"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run (6 steps), recording what last.ckpt held at the start of each step."""
    out = tmp_path_factory.mktemp("straight")
    seen = [
        f"+callbacks.last_seen._target_={LastSeen.__module__}.LastSeen",
        f"+callbacks.last_seen.record={out / 'seen.json'}",
    ]
    train(compose_config("train", [*RUN, *seen], out))
    return out


def test_last_ckpt_is_written_every_n_steps_and_at_every_epoch_end(straight):
    record = json.loads((straight / "seen.json").read_text())
    # steps 2 and 4: every_n_train_steps=2; step 3: end of epoch 0 (after its validation); 6: the end
    assert record["steps"] == [None, None, 2, 3, 4, 4]
    assert last(straight)["global_step"] == 6
    assert record["io"] == AtomicCheckpointIO.__name__  # best.ckpt and last.ckpt are written atomically
    assert (straight / "checkpoints" / "best.ckpt").is_file()
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_sigkill_mid_step_then_resume_is_exact(straight, tmp_path):
    killed = tmp_path / "killed"
    child = (
        "import sys; from conftest import compose_config; from diffseg_lightning.train import train; "
        "train(compose_config('train', sys.argv[2:], sys.argv[1]))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    # the same intra-op thread count as this process, which ran the reference: CPU kernels may sum in
    # another order with another count, and the comparison is bit for bit
    env.update(OMP_NUM_THREADS=str(torch.get_num_threads()), WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    overrides = [*RUN, *signal_at(5, signal.SIGKILL)]  # killed inside step 6, mid-epoch 1
    proc = subprocess.run(
        [sys.executable, "-c", child, str(killed), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert last(killed)["global_step"] == 4  # the every-2-steps write; the next one never came
    assert_same_state(last(straight), resume(killed, tmp_path / "resumed"))


@pytest.mark.parametrize(
    ("signum", "phase", "step", "saved", "code"),
    [
        (signal.SIGINT, "train", 4, 5, 1),  # step 5 finishes, then last.ckpt, then Lightning's exit 1
        (
            signal.SIGTERM,
            "validation",
            3,
            3,
            143,
        ),  # the validation finishes first (EMA swapped back); 128 + 15
    ],
)
def test_signal_stops_after_the_step_with_last_ckpt_and_resume_is_exact(
    straight, tmp_path, signum, phase, step, saved, code
):
    stopped = tmp_path / "stopped"
    # the handlers found before the run (SIG_IGN for SIGINT in a background job of a shell, not Python's
    # default_int_handler), which the run must give back
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(SystemExit) as exit_info:
        train(compose_config("train", [*RUN, *signal_at(step, signum, phase)], stopped))
    assert exit_info.value.code == code
    assert {s: signal.getsignal(s) for s in before} == before  # handlers given back
    state = last(stopped)
    assert state["global_step"] == saved  # 5 is neither an every-2-steps write nor an epoch end
    if phase == "validation":  # stopped after validating epoch 0, before its epoch end
        assert state["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 0
    assert_same_state(last(straight), resume(stopped, tmp_path / "resumed"))


def test_while_a_checkpoint_is_written_the_previous_one_stays_complete(tmp_path, monkeypatch):
    """A kill can strike at any moment of a write: at every moment, last.ckpt must be the previous complete file
    (checked from inside the write), and what a killed write leaves is a hidden file no *.ckpt glob finds,
    removed by the next write."""
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.arange(1000)}, path)
    real_save = torch.save
    seen = []

    def interrupted_save(obj, f):
        f.write(b"half a checkpoint")
        f.flush()
        old = torch.load(path, weights_only=False)  # the target, mid-write
        seen.append((old["step"], torch.equal(old["w"], torch.arange(1000)), Path(f.name).name))
        raise KeyboardInterrupt  # the write never finishes

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    step, intact, written_to = seen[0]
    assert (step, intact) == (1, True) and written_to.startswith(".last.ckpt.tmp-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # an exception cleans up
    (tmp_path / ".last.ckpt.tmp-99999").write_bytes(b"left by a killed run")
    monkeypatch.setattr(torch, "save", real_save)
    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=False)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the stale temporary file is gone


@pytest.mark.parametrize("steps", [-1, 1.5, "abc", True])
def test_every_n_train_steps_must_be_a_whole_number(tmp_path, steps):
    with pytest.raises(ConfigError, match=r"callbacks\.last_checkpoint\.every_n_train_steps"):
        LastCheckpoint(tmp_path, every_n_train_steps=steps)


# ------------------------------------------------------------------ checkpoints that do not fit (10b, 10c, 12)
def test_resuming_with_another_width_names_the_setting(straight, tmp_path):
    ckpt = straight / "checkpoints" / "last.ckpt"
    with pytest.raises(DiffSegError) as err:
        train(
            compose_config("train", [*RUN, "model.denoiser.base_channels=16", f"ckpt_path={ckpt}"], tmp_path)
        )
    assert str(err.value) == (
        f"checkpoint {ckpt} does not fit this run's model: model.denoiser.base_channels=8 in the checkpoint, 16 now"
    )
    assert not (tmp_path / "config.yaml").exists()  # refused before anything was written


def test_resuming_with_another_method_names_the_method(straight, tmp_path):
    ckpt = straight / "checkpoints" / "last.ckpt"
    with pytest.raises(
        DiffSegError, match=r"does not fit this run's model: model\.denoiser\._target_="
    ) as err:
        train(compose_config("train", [*RUN, "model=mbdiff", f"ckpt_path={ckpt}"], tmp_path))
    assert str(ckpt) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("noise.objective=epsilon", "noise.objective=x0 in the checkpoint, epsilon now"),
        ("noise.num_train_timesteps=500", "noise.num_train_timesteps=1000 in the checkpoint, 500 now"),
        ("noise.schedule=cosine", "noise.schedule=linear in the checkpoint, cosine now"),
    ],
)
def test_resuming_with_another_prediction_target_is_refused(straight, tmp_path, override, expected):
    ckpt = straight / "checkpoints" / "last.ckpt"
    with pytest.raises(DiffSegError) as err:
        train(compose_config("train", [*RUN, override, f"ckpt_path={ckpt}"], tmp_path))
    assert str(err.value).startswith(f"cannot resume from checkpoint {ckpt}: {expected}; ")
    assert f"resume with {override.split('=')[0]}=" in str(err.value)


def test_resuming_with_changed_sampling_optimiser_and_loss_settings_is_allowed(straight, tmp_path):
    """The sampler, the learning rate and a loss weight do not change what the network predicts; a loss weight
    is named in a warning (the run has finished its 2 epochs, so it restores and stops at once)."""
    ckpt = straight / "checkpoints" / "last.ckpt"
    changed = ["sampler=ddim", "sampler.solver.eta=0.5", "model.optimizer.lr=0.001", "noise.vlb_weight=0.5"]
    with pytest.warns(
        UserWarning, match=r"changed loss settings: noise\.vlb_weight=1\.0 in the checkpoint, 0\.5 now$"
    ):
        train(compose_config("train", [*RUN, *changed, f"ckpt_path={ckpt}"], tmp_path))


def test_a_checkpoint_that_does_not_fit_its_own_config_names_the_parameter(straight, tmp_path):
    checkpoint = load_checkpoint(straight / "checkpoints" / "last.ckpt")
    checkpoint["diffseg_config"]["model"]["denoiser"]["base_channels"] = 16  # as if from another version
    torch.save(dict(checkpoint), tmp_path / "edited.ckpt")
    edited = load_checkpoint(tmp_path / "edited.ckpt")
    sampler = compose_config("eval", [f"ckpt_path={tmp_path / 'edited.ckpt'}"], tmp_path).sampler
    with pytest.raises(DiffSegError) as err:
        module_from_checkpoint(edited, sampler)
    message = str(err.value)
    assert message.startswith(
        f"checkpoint {tmp_path / 'edited.ckpt'} does not fit the model its own config builds"
    )
    assert re.search(
        r": parameter denoiser\.\S+ is \(\d+, 8\) in the checkpoint, \(\d+, 16\) in the model$", message
    )


def test_predict_with_an_image_ddpm_checkpoint_is_one_line_before_anything_runs(tmp_path):
    path = tmp_path / "ddpm.ckpt"
    model = {"_target_": "diffseg_lightning.methods.ImageDiffusionModule"}
    torch.save({"state_dict": {}, "diffseg_config": {"model": model, "data": {}}}, path)
    from diffseg_lightning.predict import predict

    cfg = compose_config("predict", [f"ckpt_path={path}", f"input_dir={tmp_path / 'absent'}"], tmp_path)
    with pytest.raises(DiffSegError) as err:
        predict(cfg)  # the input folder does not exist: the checkpoint is refused first
    assert str(err.value).startswith(
        f"checkpoint {path} cannot be used by diffseg-predict: an image DDPM has no"
    )
    assert "diffseg-eval" in str(err.value)
