"""The zoo's paper-setting experiments run end to end under fast_dev_run with both noise kernels, on replicas of
their datasets' official layouts (their data settings as written; network widths and image sizes cut so that
each run takes seconds on 2 CPU cores)."""

from __future__ import annotations

import json

import pytest
from conftest import compose_config
from test_data_isic import write_isic
from test_data_kvasir import write_kvasir
from test_data_refuge import write_refuge

from diffseg_lightning.train import train

SMALL = {
    "medsegdiff_v2_refuge": ["data.size=32", "model.denoiser.base_channels=8", "model.denoiser.channel_mults=[1,2]", "model.denoiser.num_res_blocks=1", "model.denoiser.attention_levels=[false,true]", "model.denoiser.num_heads=2", "model.denoiser.cond_channels=8", "model.denoiser.ssformer_blocks=1", "model.denoiser.ssformer_heads=2"],
    "dtunet_kvasir": ["data.size=32", "model.denoiser.embed_dim=16", "model.denoiser.channel_mults=[1,2]", "model.denoiser.depths=[1,1]", "model.denoiser.window_sizes=[2,4]", "model.denoiser.head_channels=8", "model.denoiser.patch_size=2"],
    "mbdiff_isic2016": ["data.size=32", "model.denoiser.base_channels=8", "model.denoiser.channel_mults=[1,2]", "model.denoiser.num_res_blocks=1", "model.denoiser.attention_levels=[false,true]", "model.denoiser.num_heads=2"],
}  # fmt: skip
RUN = ["debug=fast_dev_run", "logger=csv", "~callbacks.progress_bar", "trainer.enable_model_summary=false", "data.batch_size=2", "data.eval_batch_size=2"]  # fmt: skip


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("zoo_replicas")
    write_kvasir(base / "kvasir")  # writes kvasir/Kvasir-SEG/...
    write_isic(base / "isic", 2016)
    return {
        "refuge": str(write_refuge(base / "REFUGE")),
        "kvasir": str(base / "kvasir"),
        "isic": str(base / "isic"),
    }


@pytest.mark.parametrize("experiment", sorted(SMALL))
@pytest.mark.parametrize("noise", ["gaussian", "bernoulli"])
def test_experiment_runs_with_both_kernels(experiment, noise, roots, tmp_path):
    dataset = experiment.rsplit("_", 1)[1].removesuffix("2016")
    overrides = [
        f"experiment={experiment}",
        f"data.root={roots[dataset]}",
        f"noise={noise}",
        *SMALL[experiment],
        *RUN,
    ]
    train(compose_config("train", overrides, tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_cases"] >= 1 and summary["network"]["parameters"] > 0


def test_mbdiff_experiment_uses_the_evolution_fusion_with_a_learned_variance(roots, tmp_path):
    overrides = ["experiment=mbdiff_isic2016", f"data.root={roots['isic']}", "noise.learn_variance=true", *SMALL["mbdiff_isic2016"], *RUN]  # fmt: skip
    train(compose_config("train", overrides, tmp_path))
    assert json.loads((tmp_path / "summary.json").read_text())["sampler"]["fusion"] == "evolution"


def test_unet_baseline_experiment_runs(roots, tmp_path):
    overrides = ["experiment=unet_kvasir", f"data.root={roots['kvasir']}", "data.size=32", "model.net.channels=[8,16,32,64,128]", *RUN]  # fmt: skip
    train(compose_config("train", overrides, tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sampler"]["num_samples"] == 1 and "dice" in summary["mean"]
