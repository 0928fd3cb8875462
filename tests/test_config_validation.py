"""The whole config is checked before a run reads, builds or writes anything; bad input is one line, a bug keeps
its traceback; a failed run leaves no empty run directory (issue 18, items 8-12)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import TINY, TINY_MODEL, compose_config
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffseg_lightning import train as train_cli
from diffseg_lightning.data import SegmentationDataModule
from diffseg_lightning.exceptions import ConfigError, DiffSegError
from diffseg_lightning.train import train
from diffseg_lightning.utils import CONFIG_DIR
from diffseg_lightning.utils.errors import BUG_HINT, run_cli, user_errors
from diffseg_lightning.validate import check_inference, missing_keys, validate_config

CONF = Path(CONFIG_DIR)


def one_error_line(result) -> str:
    """The run failed with exactly one ``error:`` line and no traceback; returns that line."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def train_fails_before_writing(out: Path, *overrides: str) -> str:
    """``train`` refuses the config before the data are read or any file is written; returns the message."""
    with pytest.raises(ConfigError) as failure:
        train(compose_config("train", [*TINY, *overrides], out))
    assert not out.exists() or not any(out.iterdir())
    return str(failure.value)


# --------------------------------------------------------------------------------------------- item 9: typos
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("+model.no_such_option=1", "unknown setting model.no_such_option: not a setting of "),
        ("+data.bacth_size=4", "unknown setting data.bacth_size (did you mean data.batch_size?)"),
        ("+trainer.max_epoch=3", "unknown setting trainer.max_epoch (did you mean trainer.max_epochs?)"),
        ("+model.optimizer.lrr=1", "unknown setting model.optimizer.lrr (did you mean model.optimizer.lr?)"),
        (
            "+callbacks.ema.decays=0.9",
            "unknown setting callbacks.ema.decays (did you mean callbacks.ema.decay?)",
        ),
    ],
)
def test_a_typo_names_the_key_and_lists_the_valid_ones(override, expected, tmp_path):
    message = train_fails_before_writing(tmp_path / "run", override)
    assert expected in message
    group = override.lstrip("+").split("=")[0].rsplit(".", 1)[0]
    valid = message.split(f"valid settings of {group}: ")[1].split(", ")
    assert len(valid) > 1 and valid == sorted(valid)  # the list of what the node accepts
    if group == "data":  # DataModule parameters and the dataset-level keys the split factories read
        assert {"batch_size", "num_workers", "size", "num_annotators", "num_train"} <= set(valid)


def test_every_shipped_config_passes_the_check(tmp_path):
    """No key of a shipped config is refused: every data key is read by something, every type fits."""
    cases = [("train", [f"experiment={p.stem}"]) for p in sorted((CONF / "experiment").glob("*.yaml"))]
    cases += [("check_data", [f"data={p.stem}"]) for p in sorted((CONF / "data").glob("*.yaml"))]  # no model
    cases += [("eval", []), ("predict", []), ("synthesize", [])]
    cases += [("train", [f"{group}={p.stem}", *(["noise=bernoulli"] if p.stem == "bernoulli" else [])])
              for group in ("trainer", "logger", "callbacks", "sampler")
              for p in sorted((CONF / group).glob("*.yaml")) if p.stem not in ("gpu", "ddp")]  # fmt: skip
    # (sampler=bernoulli is the Bernoulli kernel's solver: the default noise=gaussian refuses it)
    # (trainer=gpu and trainer=ddp need a GPU: on this CPU-only machine Lightning refuses them, as it should)
    refused = {}
    for name, overrides in cases:
        cfg = compose_config(name, overrides, tmp_path)
        for key in missing_keys(cfg):  # data.root, ckpt_path, ...: given on the command line
            OmegaConf.update(cfg, key, str(tmp_path / "absent"))  # the loaders check them, not this check
        try:
            validate_config(cfg)
        except ConfigError as err:
            refused[f"{name} {overrides}"] = str(err)
    assert not refused, refused


def test_a_data_key_that_a_split_factory_reads_is_accepted(tmp_path):
    # a new dataset-level key is valid once something reads it through an interpolation
    overrides = ["+data.new_key=3", "data.train.num_annotators=${data.new_key}"]
    validate_config(compose_config("train", [*TINY, *overrides], tmp_path))
    with pytest.raises(ConfigError, match=r"unknown setting data\.new_key:"):
        validate_config(compose_config("train", [*TINY, "+data.new_key=3"], tmp_path))


# ------------------------------------------------------------------- item 8: the whole config, before the run
def test_sampler_steps_above_T_fail_before_the_data_are_read(tmp_path, monkeypatch):
    def no_data(*_, **__):
        raise AssertionError("the data were read before the config was checked")

    monkeypatch.setattr(SegmentationDataModule, "setup", no_data)
    message = train_fails_before_writing(tmp_path / "run", "sampler.num_steps=5000")
    assert (
        message.startswith("sampler.num_steps=5000 is more than T=1000")
        and "(noise.num_train_timesteps)" in message
    )
    message = train_fails_before_writing(
        tmp_path / "run", "noise.num_train_timesteps=10", "sampler.num_steps=20"
    )
    assert message.startswith("sampler.num_steps=20 is more than T=10")


def test_inference_steps_are_checked_against_the_checkpoints_kernel(tmp_path):
    """diffseg-eval / -predict sample with the trained kernel: its T bounds sampler.num_steps."""
    trained = OmegaConf.to_container(
        compose_config("train", [*TINY, "noise.num_train_timesteps=50"], tmp_path)
    )
    for name, required in (("eval", ["ckpt_path=x"]), ("predict", ["ckpt_path=x", "input_dir=x"])):
        cfg = compose_config(name, [*required, "sampler.num_steps=60"], tmp_path)
        validate_config(cfg)  # the kernel is not known before the checkpoint is read
        with pytest.raises(ConfigError, match=r"num_steps=60 is more than T=50.*\(the checkpoint's noise\."):
            check_inference(cfg, trained)
        check_inference(compose_config(name, ["sampler.num_steps=50"], tmp_path), trained)
    with pytest.raises(DiffSegError, match="noise.objective cannot change at inference"):
        check_inference(compose_config("eval", ["+noise.objective=epsilon"], tmp_path), trained)


@pytest.mark.parametrize("debug", [[], ["debug=fast_dev_run"]])
def test_a_wrong_trainer_type_is_one_line_also_under_fast_dev_run(debug, tmp_path):
    message = train_fails_before_writing(tmp_path / "run", "trainer.max_epochs=abc", *debug)
    assert message == "trainer.max_epochs='abc': Trainer expects int or null"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "model.denoiser.base_channels=abc",
            "model.denoiser.base_channels='abc': MedSegDiffUNet expects int",
        ),
        ("data.size=abc", "data.train.size='abc' (from ${data.size}): SyntheticSegmentation expects int or"),
        ("model.optimizer.lr=fast", "model.optimizer.lr='fast': AdamW expects float or Tensor"),
        (
            "trainer.precision=17",
            "trainer.precision=17: Trainer expects one of [64, 32, 16, 'transformer-engine'",
        ),
        ("trainer.devices=[0,1]", "trainer: `devices` selected with `CPUAccelerator` should be an int > 0"),
        (
            "sampler.fusion=evolution",
            "fusion 'evolution' (MB-Diff's evolution-uncertainty fusion) needs a kernel",
        ),
        ("model._target_=no_such.Module", "model._target_: cannot import 'no_such.Module'"),
        (
            "model.spacing=${data.no_such_key}",
            "model.spacing: Interpolation key 'data.no_such_key' not found",
        ),
    ],
)
def test_a_bad_value_names_the_key(override, expected, tmp_path):
    assert expected in train_fails_before_writing(tmp_path / "run", override)


def test_a_missing_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^missing value for data\.root: give it on the command line"):
        validate_config(compose_config("train", [*TINY_MODEL, "data=folder"], tmp_path))
    with pytest.raises(ConfigError, match=r"^missing value for ckpt_path, input_dir:"):
        validate_config(compose_config("predict", [], tmp_path))


# ------------------------------------------------------------------------ item 10: output folders
def unwritable_folder(tmp_path: Path) -> Path:
    """A folder no file can be created in, also for root (who ignores permission bits): sysfs."""
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if not Path("/sys/kernel").is_dir():
        pytest.skip("running as root without sysfs: no folder is read-only to this process")
    return Path("/sys")


def test_an_output_dir_that_cannot_be_written_is_one_line(tmp_path):
    regular = tmp_path / "a_file"
    regular.write_text("not a folder")
    with pytest.raises(
        ConfigError, match=r"paths\.output_dir=.*/a_file/run cannot be written: it lies under "
    ):
        validate_config(compose_config("train", TINY, regular / "run"))
    with pytest.raises(
        ConfigError, match=r"^output_dir=.*a_file cannot be written: it is .*, which is a file"
    ):
        validate_config(
            compose_config("predict", ["ckpt_path=x", "input_dir=x", f"output_dir={regular}"], tmp_path)
        )
    read_only = unwritable_folder(tmp_path)
    with pytest.raises(ConfigError, match=rf"cannot be written: {read_only} is not writable \("):
        validate_config(compose_config("train", [*TINY, f"+data.cache_dir={read_only / 'cache'}"], tmp_path))


# ------------------------------------------------------------------------ item 11: user errors and bugs
def test_a_config_error_inside_instantiate_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit, user_errors():
        instantiate({"_target_": "diffseg_lightning.inference.DiffusionSampler", "num_steps": 0})
    assert exit.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sampler needs num_steps >= 1") and "\n" not in err


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(tmp_path, monkeypatch, capsys):
    """A ValueError from deep inside (here: the DataModule) is not a user error: traceback, hint, exit 1."""

    def deep(*_, **__):
        raise ValueError("something deep went wrong")

    monkeypatch.setattr(SegmentationDataModule, "setup", deep)
    cfg = compose_config("train", TINY, tmp_path / "run")

    def main() -> None:
        with user_errors():
            train(cfg)

    with pytest.raises(SystemExit) as exit:
        run_cli(main)
    assert exit.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in deep" in err
    assert err.strip().splitlines()[-1] == f"error: ValueError: something deep went wrong ({BUG_HINT})"
    # a TypeError from a target's constructor is a bug too (the config check catches the typos first)
    with pytest.raises(InstantiationException), user_errors():
        instantiate({"_target_": "diffseg_lightning.inference.DiffusionSampler", "num_stepz": 0})


# ------------------------------------------------------------ items 9, 10, 12 at the command line (in-process)
def test_a_failed_run_leaves_no_empty_run_directory(cli, tmp_path):
    """Hydra made the run directory (a sweep's too) before the task; holding only Hydra's files, it goes."""
    overrides = [*TINY, "debug=fast_dev_run", "paths.log_dir=logs"]
    result = cli(train_cli.main, *overrides, "+data.bacth_size=4", cwd=tmp_path)
    assert "unknown setting data.bacth_size (did you mean data.batch_size?)" in one_error_line(result)
    assert list((tmp_path / "logs" / "train" / "runs").iterdir()) == []
    result = cli(train_cli.main, "-m", *overrides, "+data.bacth_size=4,5", cwd=tmp_path)
    assert "unknown setting data.bacth_size" in one_error_line(result)
    assert list((tmp_path / "logs" / "train" / "multiruns").iterdir()) == []


def test_a_failed_run_keeps_a_directory_it_did_not_create(cli, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    result = cli(train_cli.main, *TINY, f"hydra.run.dir={mine}", "trainer.max_epochs=abc", cwd=tmp_path)
    assert one_error_line(result) == "error: trainer.max_epochs='abc': Trainer expects int or null"
    assert (mine / ".hydra" / "config.yaml").is_file()  # hydra.run.dir named on the command line: kept


def test_a_run_directory_hydra_cannot_create_is_one_line(cli, tmp_path):
    regular = tmp_path / "a_file"
    regular.write_text("not a folder")
    line = one_error_line(cli(train_cli.main, f"hydra.run.dir={regular}/run", cwd=tmp_path))
    assert line.startswith(
        f"error: cannot write the run directory: Not a directory: {regular}/run (it is hydra.run.dir"
    )
    read_only = unwritable_folder(tmp_path)
    line = one_error_line(cli(train_cli.main, f"hydra.run.dir={read_only}/run", cwd=tmp_path))
    assert line.startswith("error: cannot write the run directory: ") and f"{read_only}/run" in line


def test_an_unquoted_non_ascii_value_says_how_to_quote_it(cli, tmp_path):
    line = one_error_line(cli(train_cli.main, "data=folder", "data.root=/data/Ärzte", cwd=tmp_path))
    assert line.startswith("error: cannot parse the override data.root=/data/Ärzte: 'Ä' needs a quoted value")
    suggested = line.split("type it as ")[1].split(" ")[0]
    assert suggested == """'data.root="/data/Ärzte"'"""
    # what the shell passes for the suggestion (outer quotes removed) is read as the path
    line = one_error_line(cli(train_cli.main, *TINY_MODEL, "data=folder", suggested[1:-1], cwd=tmp_path))
    assert "data root /data/Ärzte does not exist" in line
