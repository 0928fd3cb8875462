"""Resuming from a checkpoint is exact: global step, optimiser, EMA and RNG."""

from __future__ import annotations

import torch
from conftest import TINY, compose_config

from diffseg_lightning.train import train

RUN = [*TINY, "data.num_train=24", "test=false"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_resume_is_exact(tmp_path):
    straight = tmp_path / "straight"
    train(compose_config("train", [*RUN, "trainer.max_epochs=2"], straight))
    first = tmp_path / "first"
    train(compose_config("train", [*RUN, "trainer.max_epochs=1"], first))
    resumed = tmp_path / "resumed"
    train(
        compose_config(
            "train",
            [*RUN, "trainer.max_epochs=2", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"],
            resumed,
        )
    )
    a, b = load(straight / "checkpoints" / "last.ckpt"), load(resumed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 2 * 3
    for key in ("state_dict", "current_model_state"):  # EMA weights and raw weights
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    adam_a, adam_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for index, state in adam_a.items():
        assert torch.equal(state["exp_avg"], adam_b[index]["exp_avg"])
    # and the weights did move in the second epoch, so the comparison is not vacuous
    one = load(first / "checkpoints" / "last.ckpt")
    assert any(not torch.equal(t, one["current_model_state"][n]) for n, t in a["current_model_state"].items())
