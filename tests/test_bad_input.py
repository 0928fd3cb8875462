"""Bad input gets a one-line error naming the problem, a non-zero exit, and earlier outputs stay intact."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, TINY_MODEL, compose_config
from PIL import Image

from diffseg_lightning import evaluate, predict
from diffseg_lightning import train as train_cli
from diffseg_lightning.train import train
from diffseg_lightning.utils.errors import DiffSegError, NonFiniteLossError

# The console scripts run in-process (the ``cli`` fixture): the same main(), exit code and stderr as a new
# process, without its seconds of imports.


def error_line(result) -> str:
    """The run failed with exit code 1, and its report is exactly one ``error:`` line."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_unknown_config_option(cli, tmp_path):
    line = error_line(cli(train_cli.main, "noise.no_such_option=1", cwd=tmp_path))
    assert "noise.no_such_option" in line
    line = error_line(cli(train_cli.main, "noise=no_such_kernel", cwd=tmp_path))
    assert "noise/no_such_kernel" in line and "gaussian" in line  # lists the valid choices


def test_invalid_option_value(cli, tmp_path):
    line = error_line(cli(train_cli.main, "noise.sampling=ddpx", *TINY, cwd=tmp_path))
    assert "ddpx" in line and "ddim" in line


def test_missing_and_corrupt_checkpoints_leave_the_run_intact(cli, trained_run, tmp_path):
    before = digest(trained_run)
    line = error_line(
        cli(
            evaluate.main,
            f"ckpt_path={tmp_path / 'nope.ckpt'}",
            f"hydra.run.dir={trained_run}",
            cwd=tmp_path,
        )
    )
    assert "nope.ckpt does not exist" in line
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"\x00garbage" * 100)
    line = error_line(cli(evaluate.main, f"ckpt_path={broken}", f"hydra.run.dir={trained_run}", cwd=tmp_path))
    assert "broken.ckpt is not a readable checkpoint" in line
    after = digest(trained_run)
    assert {k: after.get(k) for k in before} == before  # Hydra may add its logs; nothing earlier changes


def test_missing_data_root(cli, tmp_path):
    line = error_line(
        cli(train_cli.main, "data=folder", f"data.root={tmp_path / 'absent'}", *TINY_MODEL, cwd=tmp_path)
    )
    assert f"data root {tmp_path / 'absent'} does not exist" in line


def test_wrong_channel_count_in_predict(cli, trained_run, tmp_path):
    """A wrong-channel image is skipped and named; with nothing left to predict it is a one-line error (exit
    1); with something left, the rest is written and the exit code is 2 unless allow_skipped=true."""
    images = tmp_path / "rgb"
    images.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "colour.png")
    ckpt = f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}"
    line = error_line(cli(predict.main, ckpt, f"input_dir={images}", cwd=tmp_path))
    assert "colour.png: image has 3 channel(s) but the config expects 1" in line
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(images / "grey.png")
    out = tmp_path / "out"
    args = [ckpt, f"input_dir={images}", f"output_dir={out}", "sampler.num_steps=2", "sampler.num_samples=2"]
    args += ["trainer.accelerator=cpu", "progress_bar=false"]
    skipped = "skipped 1 file(s): colour.png (image has 3 channel(s) but the config expects 1)"
    result = cli(predict.main, *args, cwd=tmp_path)
    assert result.returncode == predict.EXIT_SKIPPED == 2, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "colour.png: image has 3 channel(s) but the config expects 1" in log
    assert result.stderr.splitlines()[-1] == (
        f"{skipped}; the other 1 file(s) were written to {out}; exit code 2 (allow_skipped=true exits 0)"
    )
    assert not [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert (out / "grey_mask.png").is_file() and not list(out.glob("colour*"))
    written = digest(out)
    result = cli(predict.main, *args, "allow_skipped=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert skipped in result.stdout + result.stderr  # still listed
    assert digest(out) == written  # the same outputs (seeded), nothing else


def write_folder(root: Path, n: int, nan_image: bool = False) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.normal(size=(32, 32)).astype(np.float32)
        if nan_image:
            image[3, 3] = np.nan
        Image.fromarray(image, mode="F").save(root / "images" / f"c{i}.tif")
        Image.fromarray((rng.random((32, 32)) > 0.5).astype(np.uint8) * 255).save(
            root / "masks" / f"c{i}.png"
        )


def nan_folder_config(tmp_path, *extra: str):
    write_folder(tmp_path / "data", 12, nan_image=True)
    overrides = [
        *TINY_MODEL,
        "data=folder",
        f"data.root={tmp_path / 'data'}",
        "data.channels=1",
        "data.num_workers=0",
    ]
    return compose_config("train", [*overrides, *extra], tmp_path / "run")


def test_nan_images_fail_the_data_check_before_training(tmp_path):
    with pytest.raises(DiffSegError, match=r"bad case\(s\) in the train split.*c0\.tif: image holds NaN"):
        train(nan_folder_config(tmp_path))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_nan_loss_stops_and_names_the_step(tmp_path):
    # with the data check off, the NaN reaches the loss, and the loss guard stops the run
    with pytest.raises(NonFiniteLossError, match="at global step 0"):
        train(nan_folder_config(tmp_path, "data.check=false"))


def test_channel_mismatch_fails_before_training(tmp_path):
    write_folder(tmp_path / "data", 12)
    cfg = compose_config(
        "train",
        [
            *TINY_MODEL,
            "data=folder",
            f"data.root={tmp_path / 'data'}",
            "data.channels=3",
            "data.num_workers=0",
        ],
        tmp_path / "run",
    )
    with pytest.raises(DiffSegError, match=r"c\d+\.tif: image has 1 channel\(s\) but the config expects 3"):
        train(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()
