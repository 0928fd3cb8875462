"""The BerDiff denoiser: shapes, checks, and every mask-diffusion denoiser with every kernel, end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_config

from diffseg_lightning.nets import BerDiffUNet
from diffseg_lightning.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(channels=(8, 16), attention_levels=(False, True), norm_num_groups=4, num_head_channels=8)


@pytest.mark.parametrize(("image_channels", "size"), [(1, (32, 32)), (3, (16, 48)), (4, (32, 16))])
def test_output_shape(image_channels, size):
    net = BerDiffUNet(image_channels=image_channels, out_channels=2, **SMALL)
    image, x = torch.randn(2, image_channels, *size), torch.randn(2, 1, *size)
    assert net(x, torch.tensor([3, 900]), net.encode_condition(image)).shape == (2, 2, *size)


def test_the_image_changes_the_output():
    torch.manual_seed(0)
    net = BerDiffUNet(**SMALL)
    for p in net.parameters():  # MONAI zero-initialises the output convolution
        p.data.normal_(0, 0.1)
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([10])
    a = net(x, t, torch.zeros(1, 1, 16, 16))
    b = net(x, t, torch.ones(1, 1, 16, 16))
    assert not torch.allclose(a, b)


def test_bad_inputs_are_named():
    net = BerDiffUNet(**SMALL)
    with pytest.raises(ValueError, match="expected 1 image channels"):
        net.encode_condition(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="not divisible"):
        net(torch.randn(1, 1, 15, 16), torch.tensor([1]), torch.randn(1, 1, 15, 16))


MODEL_OVERRIDES = {
    "berdiff": [
        "model.denoiser.channels=[8,16]",
        "model.denoiser.attention_levels=[false,true]",
        "model.denoiser.norm_num_groups=4",
        "model.denoiser.num_head_channels=8",
    ],
    "medsegdiff": [
        "model.denoiser.base_channels=8",
        "model.denoiser.channel_mults=[1,2]",
        "model.denoiser.attention_levels=[false,true]",
    ],
}


@pytest.mark.parametrize(
    ("model", "noise"), [("berdiff", "gaussian"), ("berdiff", "bernoulli"), ("medsegdiff", "bernoulli")]
)
def test_every_denoiser_trains_with_every_kernel(model, noise, tmp_path):
    overrides = [
        f"model={model}",
        f"noise={noise}",
        *MODEL_OVERRIDES[model],
        "data.size=32",
        "data.num_train=16",
        "data.num_val=4",
        "data.num_test=4",
        "data.batch_size=8",
        "sampler.num_steps=2",
        "sampler.num_samples=2",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "logger=csv",
        "~callbacks.progress_bar",
    ]
    train(compose_config("train", overrides, tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_cases"] == 4 and 0.0 <= summary["mean"]["iou"] <= 1.0
