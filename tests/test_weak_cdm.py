"""CDM for weakly supervised segmentation (Hu et al., MICCAI 2023) and its Grad-CAM baseline: the
difference quotient against a closed-form derivative, one batched pass per step for both conditions,
Otsu against a brute-force search, masks withheld from training, and both experiments end to end."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate
from PIL import Image
from skimage.filters import threshold_otsu
from torch import nn

from diffseg_lightning.data.datamodule import SegmentationDataModule
from diffseg_lightning.diffusion import BernoulliKernel, GaussianKernel
from diffseg_lightning.diffusion.solvers import DDIM, DDPM, DPMSolverPP2M
from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.inference.sampler import DiffusionSampler
from diffseg_lightning.methods.gradcam import GradCAMModule
from diffseg_lightning.methods.weak_cdm import WeakCDMModule, min_max_normalize, otsu_masks
from diffseg_lightning.nets.weak_cdm import ClassConditionalUNet
from diffseg_lightning.predict import predict
from diffseg_lightning.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = [
    "debug=fast_dev_run",
    "logger=csv",
    "~callbacks.progress_bar",
    "trainer.enable_model_summary=false",
    "data.batch_size=4",
    "data.eval_batch_size=4",
]
TINY_CDM = [
    "model.net.channels=[8,16]",
    "model.net.attention_levels=[false,true]",
    "model.net.num_head_channels=8",
    "model.net.norm_num_groups=4",
    "model.num_steps=2",
]
TINY_SYNTHETIC = ["data.size=32", "data.num_train=8", "data.num_val=4", "data.num_test=4"]
WITHHELD = ("mask", "masks", "instances")


class LinearToy(nn.Module):
    """eps(x, t, w) = a x + G . (w @ E): affine in the class embedding e = w @ E, so every DDIM state is
    affine in e and the difference quotient equals the derivative exactly."""

    num_classes = 2

    def __init__(self, shape: tuple[int, int, int], dim: int = 3, a: float = 0.3) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embedding = nn.Parameter(torch.randn(2, dim, generator=gen, dtype=torch.float64))
        self.register_buffer("g", torch.randn(dim, *shape, generator=gen, dtype=torch.float64))
        self.a = a
        self.calls: list[tuple[int, list[int]]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], t.tolist()))
        w = cond.double() if cond.is_floating_point() else nn.functional.one_hot(cond, 2).double()
        e = w @ self.embedding
        return self.a * x + torch.einsum("bd,dchw->bchw", e, self.g).to(x.dtype)


#: the deterministic DDIM without clipping (the images are z-scored, not in [-1, 1])
UNCLIPPED_DDIM = DiffusionSampler(solver=DDIM(eta=0.0, clip_x0=False))


def toy_module(shape=(2, 6, 5), T=60, noise_level=30, num_steps=4, step_size=1, tau=0.95, **kw):
    kernel = GaussianKernel(num_train_timesteps=T, schedule="cosine").double()
    module = WeakCDMModule(
        net=LinearToy(shape),
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        kernel=kernel,
        sampler=UNCLIPPED_DDIM,
        noise_level=noise_level,
        num_steps=num_steps,
        step_size=step_size,
        tau=tau,
        **kw,
    )
    return module.double()


@pytest.mark.parametrize("step_size", [1, 7])
def test_difference_quotient_equals_closed_form_derivative(step_size):
    """x_{t-1} = c1 x_t + c2 eps (DDIM, eta 0) with eps = a x + G e gives d x_k / d e . v = m_k with
    m_0 = 0, m_{k+1} = (c1 + c2 a) m_k + c2 G v; the saliency is sum_k m_k summed over channels, v = f(y1) - f(y0)."""
    module = toy_module(noise_level=30, num_steps=4, step_size=step_size)
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(3, 2, 6, 5, generator=gen, dtype=torch.float64)
    noise = torch.randn(image.shape, generator=gen, dtype=torch.float64)
    got = module.saliency(image, noise=noise)

    net = module.net
    k = module.kernel  # its tables (x_t = sa x_0 + s1 eps), double precision
    v = net.embedding[1] - net.embedding[0]
    g_v = torch.einsum("d,dchw->chw", v.detach(), net.g)
    m = torch.zeros_like(g_v)
    total = torch.zeros_like(g_v)
    t = 30
    for _ in range(4):
        sa, s1 = k.sqrt_alphas_cumprod[t], k.sqrt_one_minus_alphas_cumprod[t]
        la_p = k.log_alphas_cumprod[t - step_size] if t - step_size >= 0 else torch.tensor(0.0).double()
        sqrt_ap, one_m_ap = (0.5 * la_p).exp(), -torch.expm1(la_p)
        c1 = sqrt_ap / sa  # x_prev = sqrt_ap (x - s1 eps) / sa + sqrt(1 - ap) eps = c1 x + c2 eps
        c2 = one_m_ap.sqrt() - sqrt_ap * s1 / sa
        m = (c1 + c2 * net.a) * m + c2 * g_v
        total = total + m
        t -= step_size
    expected = total.sum(0, keepdim=True).expand(3, 1, 6, 5)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-6, atol=1e-8)
    assert expected.abs().max() > 1e-3  # a derivative worth checking


def test_difference_quotient_approaches_the_autodiff_derivative_on_a_nonlinear_denoiser():
    """With eps = tanh(a x + G e) the quotient is a one-sided finite difference: it tends to the directional
    derivative along f(y1) - f(y0) (torch.func.jvp of the whole chain) at first order in (1 - tau)."""

    class TanhToy(LinearToy):
        def forward(self, x, t, cond):
            return torch.tanh(super().forward(x, t, cond))

    kernel = GaussianKernel(num_train_timesteps=60, schedule="cosine").double()
    ddim = UNCLIPPED_DDIM.solver
    net = TanhToy((1, 4, 4))
    image = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def chain(w1: torch.Tensor) -> torch.Tensor:  # the accumulated state sum as a function of the weights
        x = kernel.q_sample(image, 30, noise=noise)
        total = torch.zeros_like(x)
        for t in range(30, 25, -1):
            tv = torch.full((2,), t)
            x, _ = ddim.step(kernel, net(x, tv, w1.expand(2, -1)), tv, t - 1, x)
            total = total + x
        return total.sum(1, keepdim=True)

    e1 = torch.tensor([0.0, 1.0], dtype=torch.float64)
    _, derivative = torch.func.jvp(chain, (e1,), (torch.tensor([-1.0, 1.0], dtype=torch.float64),))
    errors = []
    for tau in (0.9, 0.99, 0.999):
        module = WeakCDMModule(
            net=net,
            optimizer=torch.optim.AdamW,
            kernel=kernel,
            sampler=UNCLIPPED_DDIM,
            noise_level=30,
            num_steps=5,
            tau=tau,
        ).double()
        errors.append((module.saliency(image, noise=noise) - derivative).abs().max().item())
    # a one-sided difference: the error is first order in (1 - tau), so it shrinks ~10x per 10x smaller step
    assert all(8.0 < errors[i] / errors[i + 1] < 12.0 for i in range(2)), errors


def test_both_conditions_share_one_forward_pass_per_step():
    module = toy_module(noise_level=30, num_steps=4, step_size=2)
    image = torch.randn(3, 2, 6, 5, dtype=torch.float64)
    module.sample(image, torch.arange(3))
    assert [rows for rows, _ in module.net.calls] == [6, 6, 6, 6]  # R passes of 2B rows
    assert [ts[0] for _, ts in module.net.calls] == [30, 28, 26, 24]  # Q, Q - s, ...
    weights = module.condition_weights(3, torch.device("cpu"))
    torch.testing.assert_close(weights[:3], torch.tensor([[0.0, 1.0]] * 3))
    torch.testing.assert_close(weights[3:], torch.tensor([[0.05, 0.95]] * 3))


def test_saliency_is_reproducible_per_case_and_validated():
    module = toy_module()
    image = torch.randn(2, 2, 6, 5, dtype=torch.float64)
    a = module.sample(image, torch.tensor([4, 9]))
    b = module.sample(image[1:], torch.tensor([9]))
    torch.testing.assert_close(a["probability"][1:], b["probability"])
    assert a["mask"].shape == (2, 1, 6, 5) and a["samples"].shape == (2, 1, 1, 6, 5)
    for solver in (DDPM(), DDIM(eta=0.5), DPMSolverPP2M()):  # stochastic, or not DDIM's update
        with pytest.raises(ValueError, match="sampler=ddim sampler.solver.eta=0"):
            WeakCDMModule(
                LinearToy((1, 4, 4)), torch.optim.AdamW, GaussianKernel(), DiffusionSampler(solver=solver)
            )
    with pytest.raises(ConfigError, match="noise=gaussian"):
        WeakCDMModule(LinearToy((1, 4, 4)), torch.optim.AdamW, BernoulliKernel())
    # no sampler: the Gaussian kernel's default solver, the deterministic DDIM
    assert WeakCDMModule(LinearToy((1, 4, 4)), torch.optim.AdamW, GaussianKernel()).solver.is_deterministic
    with pytest.raises(ValueError, match="below x_0"):
        toy_module(noise_level=5, num_steps=4, step_size=2)
    with pytest.raises(ValueError, match="tau"):
        toy_module(tau=1.0)


def test_class_embedding_is_added_to_the_timestep_embedding():
    """MONAI adds f(y) to time_embed(t): moving f(y) into the time MLP's last bias gives the same output;
    a one-hot weight row equals the integer label, and a mixture embeds as tau f(y1) + (1 - tau) f(y0)."""
    torch.manual_seed(0)
    net = ClassConditionalUNet(
        1, channels=(8, 16), attention_levels=(False, True), num_head_channels=8, norm_num_groups=4
    )
    for p in net.parameters():  # MONAI zero-initialises the output convolution
        nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    y = torch.tensor([1, 1])
    out = net(x, t, y)
    torch.testing.assert_close(net(x, t, torch.tensor([[0.0, 1.0], [0.0, 1.0]])), out)
    moved = ClassConditionalUNet(
        1, channels=(8, 16), attention_levels=(False, True), num_head_channels=8, norm_num_groups=4
    )
    moved.load_state_dict(net.state_dict())
    with torch.no_grad():
        moved.unet.time_embed[-1].bias += net.class_embedding.weight[1]
        moved.class_embedding.weight.zero_()
    torch.testing.assert_close(moved(x, t, y), out)
    w = torch.tensor([[0.05, 0.95]])
    expected = 0.95 * net.class_embedding.weight[1] + 0.05 * net.class_embedding.weight[0]
    torch.testing.assert_close(net.class_embedding(w)[0], expected)


def brute_force_otsu_mask(image: np.ndarray) -> np.ndarray:
    """Otsu by exhaustion: the split of the distinct values that maximises the between-class variance."""
    values = np.unique(image)
    best, best_split = -1.0, None
    for split in values[:-1]:
        low, high = image[image <= split], image[image > split]
        w0, w1 = low.size / image.size, high.size / image.size
        between = w0 * w1 * (low.mean() - high.mean()) ** 2
        if between > best:
            best, best_split = between, split
    return image > best_split


def test_otsu_masks_match_brute_force_and_skimage():
    """scikit-image's Otsu threshold is the centre of the last background bin of a 256-bin histogram over
    [min, max]; with the levels on bin centres the exact best split is representable, so the mask must equal
    the exhaustive search's."""
    centre = (np.array([25, 115, 140]) + 0.5) / 256
    levels = np.array([0.0, *centre, 1.0])
    rng = np.random.default_rng(0)
    image = levels[rng.choice(5, size=(12, 10), p=[0.3, 0.25, 0.1, 0.15, 0.2])]
    got = otsu_masks(torch.from_numpy(image)[None, None].float())[0, 0].numpy() > 0
    np.testing.assert_array_equal(got, brute_force_otsu_mask(image))
    np.testing.assert_array_equal(got, image > threshold_otsu(image))
    two = np.zeros((10, 10))
    two[1:4, 1:4] = 1.0  # 9 pixels
    two[6:8, 6:8] = 0.9  # 4 pixels
    kept = otsu_masks(torch.from_numpy(two)[None, None].float(), largest_component=True)[0, 0].numpy()
    assert kept.sum() == 9 and kept[1:4, 1:4].all()
    assert otsu_masks(torch.ones(1, 1, 4, 4)).sum() == 0  # a constant map has no foreground
    normed = min_max_normalize(torch.tensor([[[[2.0, 4.0], [3.0, 2.0]]], [[[5.0, 5.0], [5.0, 5.0]]]]))
    torch.testing.assert_close(normed[0, 0], torch.tensor([[0.0, 1.0], [0.5, 0.0]]))
    assert normed[1].abs().sum() == 0


class NoMask(dict):
    """A batch that fails the test on any access to a pixel label."""

    def __getitem__(self, key):
        assert key not in WITHHELD, f"training read batch[{key!r}]"
        return super().__getitem__(key)

    def get(self, key, default=None):
        assert key not in WITHHELD, f"training read batch.get({key!r})"
        return super().get(key, default)


def test_masks_never_reach_training(tmp_path):
    cfg = compose_config(
        "train", ["experiment=weak_cdm_synthetic", *TINY_CDM, *TINY_SYNTHETIC, "data.batch_size=4"], tmp_path
    )
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert not set(WITHHELD) & set(batch) and {"image", "label"} <= set(batch)
    assert set(batch["label"].tolist()) <= {0, 1}
    assert "mask" in next(iter(datamodule.val_dataloader()))  # evaluation still scores masks
    from diffseg_lightning.entry import build_module

    for model in ("weak_cdm", "gradcam"):
        overrides = [f"model={model}"] if model == "gradcam" else []
        cfg = compose_config(
            "train", ["experiment=weak_cdm_synthetic", *TINY_SYNTHETIC, *overrides], tmp_path
        )
        module = build_module(cfg.model, cfg.noise, cfg.sampler)
        loss = module.training_step(NoMask(batch), 0)
        assert torch.isfinite(loss)
        loss.backward()


def test_labels_from_masks_and_withhold():
    items = [
        {"image": torch.zeros(1, 4, 4), "mask": torch.zeros(1, 4, 4), "case": "a", "index": torch.tensor(0)},
        {"image": torch.zeros(1, 4, 4), "mask": torch.eye(4)[None], "case": "b", "index": torch.tensor(1)},
    ]
    dm = SegmentationDataModule(labels="from_masks", withhold=["mask"])
    assert dm.collate(items, split="train")["label"].tolist() == [0, 1]
    assert "mask" not in dm.collate(items, split="train")
    assert "mask" in dm.collate(items, split="test") and "label" not in items[0]
    assert "label" not in SegmentationDataModule().collate(items)
    with pytest.raises(ValueError, match="data.labels"):
        SegmentationDataModule(labels="from_boxes")


def check_summary(run: Path, method: str) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_cases"] >= 1 and 0.0 <= summary["mean"]["dice"] <= 1.0
    assert summary["sampler"]["threshold"] == "otsu" and summary["sampler"]["num_samples"] == 1
    if method == "weak_cdm":
        assert summary["sampler"]["noise_level"] == 400 and summary["sampler"]["condition_tau"] == 0.95
        assert summary["sampler"]["num_train_timesteps"] == 4000
    return summary


def test_synthetic_experiment_trains_and_predicts(tmp_path):
    run = tmp_path / "run"
    train(compose_config("train", ["experiment=weak_cdm_synthetic", *RUN, *TINY_CDM, *TINY_SYNTHETIC], run))
    check_summary(run, "weak_cdm")
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(
        inputs / "x.png"
    )
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    overrides = [f"ckpt_path={ckpt}", f"input_dir={inputs}", f"output_dir={tmp_path / 'pred'}"]
    predict(
        compose_config("predict", [*overrides, "trainer.accelerator=cpu", "progress_bar=false"], tmp_path)
    )
    assert (tmp_path / "pred" / "x_mask.png").is_file() and (tmp_path / "pred" / "x_prob.png").is_file()


def test_gradcam_baseline_runs(tmp_path):
    train(
        compose_config(
            "train", ["experiment=weak_cdm_synthetic", "model=gradcam", *RUN, *TINY_SYNTHETIC], tmp_path
        )
    )
    check_summary(tmp_path, "gradcam")


def test_gradcam_map_is_not_inverted():
    """MONAI's default CAM post-processing maps max to 0; ours keeps the map: for a classifier whose lesion
    score is the mean of the input (through a ReLU feature map), the CAM is the input's positive part."""

    class MeanNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer4 = nn.ReLU()

        def forward(self, x):
            s = self.layer4(x).mean((1, 2, 3))
            return torch.stack([-s, s], 1)

    module = GradCAMModule(MeanNet(), torch.optim.AdamW)
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2:5, 2:5] = 1.0
    out = module.sample(x)
    torch.testing.assert_close(out["probability"], x)
    assert out["mask"].sum() == 9


def test_kvasir_experiment_on_a_replica(tmp_path):
    from test_data_kvasir import write_kvasir

    write_kvasir(tmp_path / "kvasir", n=20)
    overrides = [f"data.root={tmp_path / 'kvasir'}", "data.size=32", "data.context=64", *RUN, *TINY_CDM]
    run = tmp_path / "run"
    train(compose_config("train", ["experiment=weak_cdm_kvasir", *overrides], run))
    summary = check_summary(run, "weak_cdm")
    assert all(row["case"].endswith("#pos") for row in summary["metric_per_case"])
    cfg = compose_config("train", ["experiment=weak_cdm_kvasir", *overrides], run)
    train_set = instantiate(cfg.data.train)()
    labels = [train_set.entries[i][3] for i in range(len(train_set))]
    assert 0 in labels and 1 in labels
    negative = train_set[labels.index(0)]
    assert negative["mask"].sum() == 0 and negative["image"].shape == (3, 32, 32)


def test_kvasir_crops_on_the_real_subset():
    """Positive crops hold polyp pixels; negative crops hold none in the (resized) reference mask."""
    from conftest import shared_data

    from diffseg_lightning.data.negatives import KvasirPolypCrops

    crops = KvasirPolypCrops(shared_data("kvasir-seg"), "test", size=32, context=64)
    positives = [e for e in crops.entries if e[3] == 1]
    negatives = [e for e in crops.entries if e[3] == 0]
    assert len(positives) == len(crops.base) and negatives  # every image has a polyp
    assert len(negatives) + crops.without_negative == len(crops.base)
    for n, (i, y, x, label) in enumerate(crops.entries):
        window = crops.base[i]["mask"][0, y : y + 32, x : x + 32]
        assert (window.sum() > 0) == bool(label)
        assert torch.equal(crops[n]["mask"][0], window if label else torch.zeros(32, 32))
