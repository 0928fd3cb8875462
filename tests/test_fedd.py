"""FEDD (Carrion & Norouzi, MICCAI 2023): subgroup metrics, label fractions, grouped synthetic data, the
pixel-MLP ensemble, the image DDPM, and the pretrain -> checkpoint -> FEDD -> predict pipeline."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config, shared_data
from PIL import Image

from diffseg_lightning.data.groups import GroupsFromCSV
from diffseg_lightning.data.label_fraction import LabelFraction
from diffseg_lightning.data.synthetic import SyntheticSegmentation
from diffseg_lightning.data.synthetic_groups import SyntheticGroupSegmentation
from diffseg_lightning.diffusion.gaussian import GaussianKernel
from diffseg_lightning.methods.fedd import FEDDModule, classification_scores
from diffseg_lightning.methods.image_ddpm import ImageDiffusionModule
from diffseg_lightning.metrics.fairness import subgroup_report
from diffseg_lightning.nets.pixel_mlp import PixelMLPEnsemble
from diffseg_lightning.utils.errors import DiffSegError

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = ["logger=csv", "~callbacks.progress_bar", "trainer.enable_model_summary=false", "debug=fast_dev_run"]


# ----------------------------------------------------------------------------------------- fairness
def test_subgroup_report_hand_case():
    rows = [
        {"case": "a", "index": 0, "group": 0, "dice": 0.9, "hd95": 2.0},
        {"case": "b", "index": 1, "group": 0, "dice": 0.7, "hd95": float("nan")},
        {"case": "c", "index": 2, "group": 1, "dice": 0.4, "hd95": 6.0},
        {"case": "d", "index": 3, "group": 2, "dice": float("nan"), "hd95": 4.0},
    ]
    rep = subgroup_report(rows, aggregates={"n_cases": lambda members: len(members)})
    assert rep["groups"]["0"] == {"n": 2, "dice": pytest.approx(0.8), "hd95": 2.0, "n_cases": 2.0}
    assert math.isnan(rep["groups"]["2"]["dice"])
    # dice: higher is better -> worst = min over defined groups (0.8, 0.4), gap 0.4
    assert rep["worst"]["dice"] == pytest.approx(0.4) and rep["worst_group"]["dice"] == "1"
    assert rep["gap"]["dice"] == pytest.approx(0.4)
    # hd95: lower is better -> worst = max (2, 6, 4), gap 4
    assert rep["worst"]["hd95"] == 6.0 and rep["worst_group"]["hd95"] == "1" and rep["gap"]["hd95"] == 4.0
    assert rep["gap"]["n_cases"] == 1.0 and rep["worst"]["n_cases"] == 1.0
    one = subgroup_report([{"group": 5, "dice": 0.5}])
    assert one["gap"]["dice"] == 0.0 and one["worst_group"]["dice"] == "5"
    with pytest.raises(ValueError, match="without the group key"):
        subgroup_report([{"case": "x", "dice": 1.0}])


def test_classification_scores_against_pairwise_auroc():
    p = torch.tensor([0.9, 0.2, 0.6, 0.6, 0.1, 0.7])
    y = torch.tensor([1, 0, 1, 0, 0, 1])
    pos, neg = p[y == 1], p[y == 0]
    pairs = (pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()
    scores = classification_scores(p, y)
    assert scores["auroc"] == pytest.approx(pairs.mean().item())
    assert scores["accuracy"] == pytest.approx(5 / 6) and scores["positives"] == 3
    assert math.isnan(classification_scores(p, torch.ones(6, dtype=torch.long))["auroc"])


# --------------------------------------------------------------------------------------------- data
def test_label_fraction_subsets_are_seeded_and_nested():
    base = list(range(200))
    subsets = [LabelFraction(base, f, seed=3).indices for f in (0.05, 0.1, 0.15, 0.2)]
    assert [len(s) for s in subsets] == [10, 20, 30, 40]
    for small, large in zip(subsets, subsets[1:], strict=False):
        assert set(small) <= set(large)
    assert LabelFraction(base, 0.1, seed=3).indices == subsets[1]
    assert LabelFraction(base, 0.1, seed=4).indices != subsets[1]
    assert len(LabelFraction(base, 0.001)) == 1 and LabelFraction(base, 1.0).indices == base
    assert LabelFraction(base, 0.1, seed=3)[0] == subsets[1][0]
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        LabelFraction(base, 0.0)


def test_synthetic_groups_shift_appearance_not_anatomy():
    kw = {"num_cases": 40, "size": 24, "seed": 1, "split": "train"}
    plain = SyntheticSegmentation(**kw)
    grouped = SyntheticGroupSegmentation(group_fractions=(0.5, 0.5), group_noise=(0.0, 0.8), **kw)
    groups = [int(grouped[i]["group"]) for i in range(40)]
    assert set(groups) == {0, 1} and grouped[0]["group"].dtype == torch.int64
    assert groups == [int(grouped[i]["group"]) for i in range(40)]  # deterministic
    for i in range(6):
        a, b = plain[i], grouped[i]
        assert torch.equal(a["mask"], b["mask"]) and int(a["label"]) == int(b["label"])
        offset = grouped.group_offset[groups[i]]
        same = torch.allclose(a["image"] + offset, b["image"])
        assert same == (groups[i] == 0)  # group 0 adds no noise; group 1 does
    with pytest.raises(ValueError, match="one value per group"):
        SyntheticGroupSegmentation(group_fractions=(0.5, 0.5), group_noise=(0.0,), **kw)


def test_groups_from_csv(tmp_path):
    data = [{"case": f"c{i}", "image": torch.zeros(1, 4, 4)} for i in range(3)]
    path = tmp_path / "groups.csv"
    path.write_text("case,tone\nc0,dark\nc1,light\nc2,dark\n")
    wrapped = GroupsFromCSV(data, path, group_column="tone")
    assert wrapped.group_names == ["dark", "light"] and [int(wrapped[i]["group"]) for i in range(3)] == [
        0,
        1,
        0,
    ]
    path.write_text("case,tone\nc0,1\nc1,2\n")
    with pytest.raises(DiffSegError, match=r"'c2' is not in the group CSV .*groups.csv"):
        GroupsFromCSV(data, path, group_column="tone")[2]
    assert int(GroupsFromCSV(data, path, group_column="tone", missing=-1)[2]["group"]) == -1
    with pytest.raises(DiffSegError, match="no column 'group'"):
        GroupsFromCSV(data, path)


# --------------------------------------------------------------------------------------------- nets
def test_pixel_mlp_ensemble_members_are_independent_mlps():
    torch.manual_seed(0)
    head = PixelMLPEnsemble(6, out_channels=1, num_members=3, hidden=(5, 4)).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in head.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 6, 3, 3)
    out = head(x)
    assert out.shape == (2, 3, 1, 3, 3)
    conv1, bn1, conv2, bn2, conv3 = (m for m in head.layers if not isinstance(m, torch.nn.ReLU))
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 6)  # every pixel as a feature vector
    for s in range(3):  # member s as a plain MLP: Linear -> ReLU -> BN -> Linear -> ReLU -> BN -> Linear

        def bn(v, layer, rows):
            return (v - layer.running_mean[rows]) / torch.sqrt(
                layer.running_var[rows] + layer.eps
            ) * layer.weight[rows] + layer.bias[rows]

        r1, r2, r3 = slice(5 * s, 5 * s + 5), slice(4 * s, 4 * s + 4), slice(s, s + 1)
        h = bn(F.relu(F.linear(pixels, conv1.weight[r1, :, 0, 0], conv1.bias[r1])), bn1, r1)
        h = bn(F.relu(F.linear(h, conv2.weight[r2, :, 0, 0], conv2.bias[r2])), bn2, r2)
        ref = F.linear(h, conv3.weight[r3, :, 0, 0], conv3.bias[r3]).reshape(2, 3, 3)
        torch.testing.assert_close(out[:, s, 0], ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- image DDPM
def tiny_ddpm(kernel: GaussianKernel) -> ImageDiffusionModule:
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(0)
    net = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=(8, 8),
        attention_levels=(False, False),
        num_res_blocks=1,
        norm_num_groups=4,
    )
    return ImageDiffusionModule(net, kernel, optimizer=torch.optim.Adam, eval_timesteps=3, eval_seed=5)


def test_image_ddpm_denoising_loss_matches_per_timestep_computation():
    kernel = GaussianKernel(num_train_timesteps=20)
    module = tiny_ddpm(kernel).eval()
    assert module.eval_timesteps == [0, 10, 19]
    x0 = torch.randn(2, 1, 16, 16)
    loss = module.denoising_loss({"image": x0})
    noise = torch.randn((3, 1, 16, 16), generator=torch.Generator().manual_seed(5))
    expected = torch.zeros(2)
    with torch.no_grad():
        for k, t in enumerate([0, 10, 19]):
            tt = torch.full((2,), t)
            x_t = kernel.q_sample(x0, tt, noise=noise[k].expand(2, -1, -1, -1))
            expected += (module.net(x_t, tt) - noise[k]).square().flatten(1).mean(1) / 3
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(RuntimeError, match="no segmentation output"):
        module.predict_step({"image": x0}, 0)
    with pytest.raises(KeyError, match="post"):
        ImageDiffusionModule(module.net, kernel, torch.optim.Adam, target_key="post").denoising_loss(
            {"image": x0}
        )


# ------------------------------------------------------------------------------------------ FEDD end to end
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """experiment=fedd_pretrain_synthetic under fast_dev_run: an image DDPM checkpoint."""
    from diffseg_lightning.train import train

    out = tmp_path_factory.mktemp("pretrain")
    train(compose_config("train", ["experiment=fedd_pretrain_synthetic", *QUIET], out))
    return out


def test_pretrain_reports_denoising_loss(pretrained):
    import json

    summary = json.loads((pretrained / "summary.json").read_text())
    assert set(summary["mean"]) == {"loss"} and summary["mean"]["loss"] > 0
    assert summary["sampler"]["evaluation"] == "denoising_loss" and summary["num_cases"] == 32


def test_fedd_loads_backbone_trains_and_predicts(pretrained, tmp_path):
    import json

    from diffseg_lightning.predict import predict
    from diffseg_lightning.train import train

    ckpt = pretrained / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no random-backbone warning with a checkpoint
        module = FEDDModule(torch.optim.Adam, backbone_ckpt=str(ckpt), timesteps=[50, 250], num_classifiers=3)
    loaded = module.extractor.backbone.state_dict()
    assert all(torch.equal(loaded[k[4:]], v) for k, v in state.items() if k.startswith("net."))
    assert module.extractor.kernel.num_train_timesteps == 1000
    assert all(not p.requires_grad for p in module.extractor.backbone.parameters())

    run = tmp_path / "fedd"
    cache = tmp_path / "cache"
    overrides = [
        "experiment=fedd_synthetic",
        *QUIET,
        f"model.backbone_ckpt={ckpt}",
        f"model.feature_cache={cache}",
        "model.num_classifiers=4",
    ]
    metrics = train(compose_config("train", overrides, run))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sampler"]["num_samples"] == 4 and summary["sampler"]["backbone_ckpt"] == str(ckpt)
    assert 0 <= summary["mean"]["iou"] <= 1 and "group" not in summary["mean"]
    logged = {name.split("/", 1)[-1] for name in metrics}
    assert "iou" in logged and not logged & {"group", "class_label", "class_probability"}  # not metrics
    assert summary["classification"]["num_cases"] == 16 and 0 <= summary["classification"]["accuracy"] <= 1
    sub = summary["subgroups"]
    assert sum(g["n"] for g in sub["groups"].values()) == 16
    assert sub["gap"]["dice"] == pytest.approx(
        max(g["dice"] for g in sub["groups"].values()) - min(g["dice"] for g in sub["groups"].values())
    )
    assert any(cache.rglob("*.pt"))  # features were cached

    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b"):
        Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)).save(
            images / f"{name}.png"
        )
    result = predict(
        compose_config(
            "predict",
            [
                f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                f"input_dir={images}",
                f"output_dir={tmp_path / 'pred'}",
                "trainer.accelerator=cpu",
                "progress_bar=false",
            ],
            tmp_path,
        )
    )
    assert result and (tmp_path / "pred" / "a_mask.png").exists()


def test_fedd_random_backbone_warns_and_validates():
    from monai.networks.nets import DiffusionModelUNet

    net = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=(8, 8),
        attention_levels=(False, False),
        num_res_blocks=1,
        norm_num_groups=4,
    )
    with pytest.warns(UserWarning, match="RANDOM weights"):
        module = FEDDModule(torch.optim.Adam, backbone=net, kernel=GaussianKernel(), num_classifiers=2)
    assert module.extractor.blocks == ["up_blocks.0", "up_blocks.1"]
    assert module.pixel_head.in_channels == module.extractor.out_channels == (8 + 8) * 3
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="valid blocks are"):
        FEDDModule(torch.optim.Adam, backbone=net, kernel=GaussianKernel(), blocks=["decoder"])
    with pytest.raises(DiffSegError, match="does not exist"):
        FEDDModule(torch.optim.Adam, backbone_ckpt="/nonexistent/x.ckpt")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="cache_dtype"):
        FEDDModule(torch.optim.Adam, backbone=net, kernel=GaussianKernel(), cache_dtype="int8")


def test_fedd_kvasir_experiment_runs(tmp_path):
    from diffseg_lightning.train import train

    root = shared_data("kvasir-seg")
    overrides = [
        "experiment=fedd_kvasir",
        *QUIET,
        f"data.root={root}",
        "model.backbone_ckpt=null",
        "data.size=32",
        "model.num_classifiers=2",
        "data.num_workers=0",
        f"model.feature_cache={tmp_path / 'cache'}",
        "model.cache_dtype=float16",
        "model.backbone.channels=[8,8,8]",
        "model.backbone.norm_num_groups=4",
        "model.backbone.num_head_channels=8",
    ]
    with pytest.warns(UserWarning, match="RANDOM weights"):
        train(compose_config("train", overrides, tmp_path))
    assert (tmp_path / "summary.json").exists()
