"""Instance-aware gland diffusion (Sun, Huang & Zheng, MICCAI 2023): box utilities and NMS against brute force,
Hungarian matching against brute force, the GlaS object F1 by hand, the dynamic filter head, RoIAlign on a
linear feature map, the box diffusion on an oracle, and the experiments end to end (+ predict)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from PIL import Image
from test_data_glas import write_glas
from torch import nn

from diffseg_lightning.diffusion import BernoulliKernel
from diffseg_lightning.diffusion.gaussian import GaussianKernel
from diffseg_lightning.diffusion.solvers import DDIM, DDPM, BernoulliPosterior, DPMSolverPP2M
from diffseg_lightning.exceptions import ConfigError, DiffSegError
from diffseg_lightning.inference.sampler import DiffusionSampler
from diffseg_lightning.methods.gland_diffusion import (
    GlandDiffusionModule,
    glas_f1,
    hungarian_match,
    instance_boxes,
    matching_cost,
)
from diffseg_lightning.nets.gland_diffusion import DynamicMaskHead, GlandDiffusionNet, ResNetFPN, roi_align
from diffseg_lightning.utils.boxes import (
    apply_deltas,
    batched_nms,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
)

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ["logger=csv", "~callbacks.progress_bar", "trainer.enable_model_summary=false"]


def random_xyxy(gen: torch.Generator, n: int, size: float = 20.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * size
    wh = torch.rand(n, 2, generator=gen) * size / 2 + 0.5
    return torch.cat([xy, xy + wh], dim=1)


# ----------------------------------------------------------------------------------------------- boxes
def brute_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def brute_nms(boxes, scores, groups, thr) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    for i in order:
        if all(groups[j] != groups[i] or brute_iou(boxes[i], boxes[j]) <= thr for j in kept):
            kept.append(i)
    return kept


def test_box_formats_iou_and_giou():
    gen = torch.Generator().manual_seed(0)
    a, b = random_xyxy(gen, 5), random_xyxy(gen, 4)
    assert torch.allclose(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(a)), a, atol=1e-5)
    expected = torch.tensor([[brute_iou(x.tolist(), y.tolist()) for y in b] for x in a])
    assert torch.allclose(box_iou(a, b), expected, atol=1e-6)
    # GIoU by hand: unit squares [0,1]^2 and [2,3]x[0,1]: IoU 0, hull 3, union 2 -> -1/3
    g = generalized_box_iou(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([[2.0, 0, 3, 1]]))
    assert torch.allclose(g, torch.tensor([[-1 / 3]]))
    # [0,2]^2 and [1,3]^2: IoU 1/7, hull 9, union 7 -> 1/7 - 2/9
    g = generalized_box_iou(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 3, 3]]))
    assert torch.allclose(g, torch.tensor([[1 / 7 - 2 / 9]]))


def test_apply_deltas_by_hand():
    box = torch.tensor([[10.0, 20.0, 30.0, 60.0]])  # cx 20, cy 40, w 20, h 40
    deltas = torch.tensor([[1.0, -2.0, float(np.log(2.0)), 0.0]])  # weights (2, 2, 1, 1): dx 0.5, dy -1
    cx, cy, w, h = 20 + 0.5 * 20, 40 - 1 * 40, 40.0, 40.0
    assert torch.allclose(
        apply_deltas(deltas, box), torch.tensor([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]])
    )


@pytest.mark.parametrize("seed", range(4))
def test_batched_nms_matches_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 30
    centres = torch.rand(6, 2, generator=gen) * 20  # clusters, so that boxes overlap
    xy = centres[torch.randint(6, (n,), generator=gen)] + torch.randn(n, 2, generator=gen)
    boxes = torch.cat([xy, xy + 4 + torch.rand(n, 2, generator=gen) * 3], dim=1)
    scores = torch.rand(n, generator=gen).round(decimals=1)  # ties happen
    groups = torch.randint(3, (n,), generator=gen)
    for thr in (0.0, 0.3, 0.5, 0.7):
        kept = batched_nms(boxes, scores, groups, thr).tolist()
        assert kept == brute_nms(boxes.tolist(), scores.tolist(), groups.tolist(), thr)
    assert batched_nms(boxes[:0], scores[:0], groups[:0], 0.5).numel() == 0
    with pytest.raises(ValueError, match="iou_threshold"):
        batched_nms(boxes, scores, groups, 1.5)


def test_instance_boxes_match_brute_force():
    labels = torch.zeros(12, 10, dtype=torch.long)
    labels[1:4, 2:7] = 3
    labels[6:11, 0:2] = 7
    labels[8, 5] = 9
    boxes, masks = instance_boxes(labels)
    expected = []
    for k in (3, 7, 9):
        ys, xs = np.nonzero(labels.numpy() == k)
        expected.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert boxes.tolist() == expected
    assert torch.equal(masks[1], labels == 7)
    assert instance_boxes(torch.zeros(4, 4, dtype=torch.long))[0].shape == (0, 4)


# ------------------------------------------------------------------------------------------ matching
def test_matching_cost_by_hand():
    logits = torch.tensor([0.0, 2.0])
    boxes = torch.tensor([[0.0, 0, 10, 10], [5.0, 5, 15, 15]])
    gt = torch.tensor([[0.0, 0, 10, 10]])
    cost = matching_cost(logits, boxes, gt, (20, 20))
    p = torch.sigmoid(torch.tensor(2.0))
    cls = 0.25 * (1 - p) ** 2 * -torch.log(p) - 0.75 * p**2 * -torch.log(1 - p)
    l1 = 4 * 5 / 20
    giou = 25 / 175 - (225 - 175) / 225
    assert torch.allclose(cost[1, 0], 2 * cls + 5 * l1 - 2 * giou, atol=1e-5)
    cls0 = float(0.25 * 0.25 * np.log(2) - 0.75 * 0.25 * np.log(2))
    assert torch.allclose(cost[0, 0], torch.tensor(2 * cls0 - 2.0), atol=1e-5)


@pytest.mark.parametrize(("n", "m", "seed"), [(4, 3, 0), (5, 2, 1), (3, 3, 2), (6, 4, 3)])
def test_hungarian_matching_against_brute_force(n, m, seed):
    gen = torch.Generator().manual_seed(seed)
    cost = matching_cost(torch.randn(n, generator=gen), random_xyxy(gen, n), random_xyxy(gen, m), (24, 24))
    pred, ref = hungarian_match(cost)
    assert sorted(ref.tolist()) == list(range(m)) and len(set(pred.tolist())) == m
    best = min(
        sum(cost[p, g].item() for g, p in enumerate(perm)) for perm in itertools.permutations(range(n), m)
    )
    assert cost[pred, ref].sum().item() == pytest.approx(best, abs=1e-5)


# --------------------------------------------------------------------------------------- GlaS metric
def test_glas_f1_by_hand():
    gt = np.zeros((10, 10), np.int64)
    gt[0:4, 0:4] = 5  # 16 px
    gt[6:10, 6:10] = 2  # 16 px
    gt[0:2, 7:10] = 9  # 6 px, missed
    pred = np.zeros_like(gt)
    pred[0:3, 0:4] = 1  # covers 12/16 of gland 5: TP
    pred[6:10, 6:8] = 4  # covers 8/16 of gland 2: not > half: FP
    pred[8:10, 0:2] = 3  # overlaps nothing: FP
    out = glas_f1(pred, gt)
    assert (out["tp"], out["fp"], out["fn"]) == (1, 2, 2)
    assert out["f1"] == pytest.approx(2 / (2 + 2 + 2))
    assert glas_f1(gt, gt)["f1"] == 1.0
    assert np.isnan(glas_f1(np.zeros_like(gt), np.zeros_like(gt))["f1"])
    assert glas_f1(np.zeros_like(gt), gt)["f1"] == 0.0


# ---------------------------------------------------------------------------------------- the network
def test_dynamic_mask_head_shapes_and_per_instance_filters():
    head = DynamicMaskHead(in_channels=4, channels=8, num_layers=3)
    assert head.num_params == (6 * 8 + 8) + (8 * 8 + 8) + (8 + 1)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 4, 6, 5, generator=gen)
    centres = torch.rand(2, 3, 2, generator=gen) * 20
    params = torch.randn(2, 3, head.num_params, generator=gen)
    out = head(feats, centres, params, (24, 20))
    assert out.shape == (2, 3, 6, 5)
    changed = params.clone()
    changed[1, 2] = torch.randn(head.num_params, generator=gen)
    out2 = head(feats, centres, changed, (24, 20))
    assert not torch.allclose(out2[1, 2], out[1, 2])  # that instance's mask changes ...
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.equal(out2[mask], out[mask])  # ... and no other
    # the relative coordinates make the same filter give different masks at different centres
    moved = centres.clone()
    moved[0, 0] += 5
    assert not torch.allclose(head(feats, moved, params, (24, 20))[0, 0], out[0, 0])


def test_one_layer_head_is_a_1x1_convolution_on_features_and_relative_coordinates():
    head = DynamicMaskHead(in_channels=2, num_layers=1)
    feats = torch.randn(1, 2, 4, 4)
    centre = torch.tensor([[[6.0, 2.0]]])  # (x, y) on a 16 x 16 image; F_mask pixel centres at 2, 6, 10, 14
    params = torch.tensor([[[0.5, -1.0, 2.0, 3.0, 0.25]]])  # w_f0, w_f1, w_x, w_y, bias
    xs = (torch.arange(4) * 4 + 2.0 - 6.0) / 16
    ys = (torch.arange(4) * 4 + 2.0 - 2.0) / 16
    expected = 0.5 * feats[0, 0] - feats[0, 1] + 2 * xs[None, :] + 3 * ys[:, None] + 0.25
    assert torch.allclose(head(feats, centre, params, (16, 16))[0, 0], expected, atol=1e-6)


def test_roi_align_on_a_linear_feature_map():
    """Bilinear sampling is exact on a linear map: every bin holds the feature value at the bin's centre."""
    h = w = 32
    feats = []
    for stride in (4, 8, 16, 32):
        n = h // stride
        centres = (torch.arange(n) + 0.5) * stride  # pixel centre of each feature cell
        feats.append(torch.stack([centres[None, :].expand(n, n), centres[:, None].expand(n, n)])[None])
    boxes = torch.tensor([[[4.0, 6.0, 18.0, 13.0], [8.0, 8.0, 24.0, 22.0]]])
    out = roi_align(feats, boxes, (h, w), output_size=4, sampling_ratio=2, canonical_size=224.0)
    for k, (x1, y1, x2, y2) in enumerate(boxes[0].tolist()):
        cx = x1 + (torch.arange(4) + 0.5) * (x2 - x1) / 4
        cy = y1 + (torch.arange(4) + 0.5) * (y2 - y1) / 4
        assert torch.allclose(out[0, k, 0], cx[None, :].expand(4, 4), atol=1e-4)
        assert torch.allclose(out[0, k, 1], cy[:, None].expand(4, 4), atol=1e-4)


def tiny_net(channels: int = 3) -> GlandDiffusionNet:
    backbone = ResNetFPN(channels, "basic", (1, 1, 1, 1), (8, 8, 16, 16), fpn_channels=16)
    return GlandDiffusionNet(
        backbone, channels, fpn_channels=16, num_stages=2, nhead=2, dim_feedforward=16, dim_dynamic=4,
        mask_branch_channels=8, mask_branch_convs=1,
    )  # fmt: skip


def test_network_shapes_and_conditional_encoding():
    torch.manual_seed(0)
    net = tiny_net().eval()
    image = torch.randn(2, 3, 32, 32)
    cond = net.encode(image)
    assert [f.shape[-1] for f in cond["features"]] == [8, 4, 2, 1]
    assert cond["mask_features"].shape == (2, 8, 8, 8)
    boxes = torch.tensor([[4.0, 4.0, 20.0, 20.0]]).expand(2, 5, 4)
    out = net.decode(boxes, torch.tensor([10, 999]), cond)
    assert out["logits"].shape == (2, 2, 5) and out["boxes"].shape == (2, 2, 5, 4)
    assert out["filters"].shape == (2, 5, net.mask_head.num_params)
    assert net.masks(cond, out["boxes"][-1], out["filters"]).shape == (2, 5, 32, 32)
    plain = net.backbone(image)
    assert not torch.allclose(plain[0], cond["features"][0])  # the image encoding was added
    with pytest.raises(DiffSegError):
        ResNetFPN(3, pretrained_path="/nonexistent/resnet.pt")


def test_pretrained_backbone_weights_load(tmp_path):
    source = ResNetFPN(3, "basic", (1, 1, 1, 1), (8, 8, 16, 16), fpn_channels=8)
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in source.resnet.state_dict().items()}}, tmp_path / "w.pt"
    )
    loaded = ResNetFPN(
        3, "basic", (1, 1, 1, 1), (8, 8, 16, 16), fpn_channels=8, pretrained_path=str(tmp_path / "w.pt")
    )
    assert torch.equal(loaded.resnet.conv1.weight, source.resnet.conv1.weight)


# --------------------------------------------------------------------------------- the box diffusion
class OracleNet(nn.Module):
    """Returns the true boxes (x0) and a confident score whatever it is given; records the timesteps."""

    def __init__(self, boxes: torch.Tensor) -> None:
        super().__init__()
        self.boxes = boxes  # (B, N, 4) xyxy pixels
        self.timesteps: list[int] = []
        self.mask_head = DynamicMaskHead(in_channels=1, num_layers=1)

    def encode(self, image):
        return {"image": image, "mask_features": torch.zeros(image.shape[0], 1, *image.shape[-2:])}

    def decode(self, boxes, t, cond):
        self.timesteps.append(int(t[0]))
        b, n, _ = self.boxes.shape
        return {
            "logits": torch.full((1, b, n), 5.0),
            "boxes": self.boxes[None],
            "filters": torch.zeros(b, n, self.mask_head.num_params),
        }

    def masks(self, cond, boxes, filters):  # each instance's box, as a mask logit of +-10
        h, w = cond["image"].shape[-2:]
        ys, xs = torch.arange(h)[:, None] + 0.5, torch.arange(w)[None, :] + 0.5
        b = boxes[..., None, None]
        inside = (
            (xs > b[..., 0, :, :]) & (xs < b[..., 2, :, :]) & (ys > b[..., 1, :, :]) & (ys < b[..., 3, :, :])
        )
        return inside.float() * 20 - 10


def oracle_module(boxes, num_steps, eta=0.0, renewal=False, objective="x0", clip=False, solver=None):
    kernel = GaussianKernel(1000, "cosine", objective=objective)
    solver = solver if solver is not None else DDIM(eta=eta, clip_x0=clip)
    sampler = DiffusionSampler(num_steps=num_steps, num_samples=1, seed=3, solver=solver)
    return GlandDiffusionModule(
        OracleNet(boxes), kernel, sampler, optimizer=torch.optim.AdamW, num_proposals=boxes.shape[1],
        box_renewal=renewal,
    )  # fmt: skip


@pytest.mark.parametrize("num_steps", [1, 2, 5])
def test_box_diffusion_recovers_the_boxes_with_an_oracle(num_steps):
    """Strided DDIM (eta = 0) with an oracle: the first step is T-1, every intermediate signal has exactly the
    marginal of q(x_{t_prev} | x0) for the prior's noise, and the final boxes are the true ones."""
    boxes = torch.tensor([[[2.0, 3.0, 12.0, 9.0], [16.0, 18.0, 30.0, 31.0], [20.0, 2.0, 30.0, 12.0]]])
    module = oracle_module(boxes, num_steps)
    kernel, size = module.kernel, (32, 32)
    x0 = module.boxes_to_signal(boxes, size)
    seen: list[tuple[int, torch.Tensor]] = []
    solver = module.sampler.solver
    step = solver.step

    def recording(kernel, out, t, t_prev, x_t, generator=None, state=None):
        x_prev, x0_pred = step(kernel, out, t, t_prev, x_t, generator=generator, state=state)
        seen.append((int(t_prev[0]), x_prev))
        return x_prev, x0_pred

    solver.step = recording
    image = torch.zeros(1, 1, 32, 32)
    det = module.detect(image, torch.tensor([0]))
    expected_steps = kernel.inference_timesteps(num_steps).tolist()
    assert module.net.timesteps == expected_steps and expected_steps[0] == 999
    assert torch.allclose(det["boxes"], boxes)
    eps = torch.randn((3, 4), generator=torch.Generator().manual_seed(3 * 1_000_003))[
        None
    ]  # the case's prior
    assert [t_prev for t_prev, _ in seen] == [*expected_steps[1:], -1]
    for t_prev, x_prev in seen[:-1]:
        assert torch.allclose(
            x_prev, kernel.q_sample(x0, torch.tensor([t_prev]), noise=eps), atol=5e-4
        )  # float32
    assert torch.allclose(seen[-1][1], x0, atol=1e-5)  # the final step (t_prev = -1) lands on x0 itself
    assert torch.allclose(module.signal_to_boxes(x0, size), boxes, atol=1e-5)
    # inference: the oracle's boxes survive score threshold and NMS (IoU <= 0.5 between them)
    out = module.sample(image, torch.tensor([0]))
    assert out["instances"].shape == (1, 32, 32) and out["probability"].shape == (1, 1, 32, 32)
    assert torch.equal(out["instances"] > 0, out["mask"][:, 0].bool())
    assert out["instances"].unique().tolist() == [0, 1, 2, 3]
    picks = [int(out["instances"][0, y, x]) for y, x in ((5, 5), (24, 24), (6, 25))]
    assert sorted(picks) == [1, 2, 3] and int(out["instances"][0, 31, 0]) == 0


def test_nms_removes_duplicates_and_renewal_draws_fresh_noise():
    boxes = torch.tensor([[[2.0, 2.0, 12.0, 12.0], [2.5, 2.0, 12.0, 12.5], [20.0, 20.0, 30.0, 30.0]]])
    module = oracle_module(boxes, 3, eta=1.0, renewal=True)
    out = module.sample(torch.zeros(1, 1, 32, 32), torch.tensor([0]))
    assert int((out["scores"] > 0).sum()) == 2  # the near-duplicate is suppressed
    assert torch.allclose(out["boxes"][0, :2], boxes[0, [0, 2]])


def test_the_kernel_must_predict_unclipped_x0():
    boxes = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="objective='x0'"):
        oracle_module(boxes, 2, objective="epsilon")
    with pytest.raises(ValueError, match="clip_x0=false"):
        oracle_module(boxes, 2, clip=True)
    with pytest.raises(ConfigError, match="sampler.solver.clip_x0=false"):
        oracle_module(boxes, 2, solver=DPMSolverPP2M())  # clips by default
    with pytest.raises(ConfigError, match="noise=gaussian noise.objective=x0"):
        GlandDiffusionModule(
            OracleNet(boxes),
            BernoulliKernel(),
            DiffusionSampler(),
            optimizer=torch.optim.AdamW,
            num_proposals=2,
        )
    with pytest.raises(ConfigError, match="sampler=ddim"):  # a solver of another kernel: named at build time
        oracle_module(boxes, 2, solver=BernoulliPosterior())


@pytest.mark.parametrize(
    ("solver", "deterministic"),
    [
        (DDIM(eta=0.0, clip_x0=False), True),
        (DDIM(eta=1.0, clip_x0=False), False),
        (DDPM(clip_x0=False), False),
    ],
)
def test_settings_report_the_solver(solver, deterministic):
    """``deterministic`` is the solver's (DDPM draws at every step whatever eta was: it used to say True)."""
    settings = oracle_module(torch.zeros(1, 2, 4), 2, solver=solver).inference_settings()
    assert settings["deterministic"] is deterministic and settings["update"] == solver.name
    assert settings["solver"] == solver.options() and settings["num_samples"] == 1


def test_padded_targets_keep_the_references_first():
    module = oracle_module(torch.zeros(1, 8, 4), 1)
    gt = torch.tensor([[0.0, 0.0, 16.0, 8.0], [8.0, 8.0, 32.0, 32.0]])
    padded = module.padded_targets(gt, (32, 32))
    assert padded.shape == (8, 4)
    assert torch.allclose(padded[:2], torch.tensor([[0.25, 0.125, 0.5, 0.25], [0.625, 0.625, 0.75, 0.75]]))
    assert (padded[2:, 2:] >= 1e-4).all()
    assert torch.allclose(module.padded_targets(gt[:0], (32, 32))[0], torch.tensor([0.5, 0.5, 1.0, 1.0]))


# ---------------------------------------------------------------------------------- end to end
def check_summary(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    for name in ("object_f1", "object_dice", "object_hausdorff", "dice"):
        assert name in summary["mean"], name
    assert summary["num_cases"] >= 1
    return summary


def test_synthetic_experiment_trains_and_predicts(tmp_path):
    from diffseg_lightning.predict import predict
    from diffseg_lightning.train import train

    run = tmp_path / "run"
    limits = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
              "+trainer.limit_test_batches=1", "trainer.accelerator=cpu", "data.num_train=16"]  # fmt: skip
    train(compose_config("train", ["experiment=gland_diffusion_synthetic", *limits, *RUN], run))
    summary = check_summary(run)
    assert summary["sampler"]["num_proposals"] == 20 and summary["sampler"]["num_steps"] == 2
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(inputs / "a.png")
    overrides = [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"input_dir={inputs}",
                 f"output_dir={tmp_path / 'pred'}", "trainer.accelerator=cpu", "progress_bar=false", "overlay=false"]  # fmt: skip
    result = predict(compose_config("predict", overrides, tmp_path))
    assert len(result["written"]) == 1 and (tmp_path / "pred" / "a_mask.png").exists()


GLAS_SMALL = [
    "data.size=32", "data.batch_size=2", "data.eval_batch_size=2", "model.num_proposals=10",
    "model.net.fpn_channels=16", "model.net.num_stages=1", "model.net.nhead=2", "model.net.dim_feedforward=16",
    "model.net.dim_dynamic=4", "model.net.mask_branch_channels=8", "model.net.mask_branch_convs=1",
    "model.net.backbone.block=basic", "model.net.backbone.layers=[1,1,1,1]",
    "model.net.backbone.block_inplanes=[8,8,16,16]",
]  # fmt: skip


def test_glas_experiments_run_on_a_replica(tmp_path):
    """experiment=gland_diffusion_glas and its U-Net + connected components baseline, on the official layout."""
    from diffseg_lightning.train import train

    write_glas(tmp_path / "glas")
    root = f"data.root={tmp_path / 'glas'}"
    train(compose_config("train", ["experiment=gland_diffusion_glas", root, "debug=fast_dev_run", *GLAS_SMALL, *RUN], tmp_path / "diff"))  # fmt: skip
    summary = check_summary(tmp_path / "diff")
    assert summary["sampler"]["num_proposals"] == 10 and summary["sampler"]["signal_scale"] == 2.0
    unet = ["data.size=32", "data.batch_size=2", "data.eval_batch_size=2", "model.net.channels=[8,16]", "model.net.strides=[2]"]  # fmt: skip
    train(compose_config("train", ["experiment=gland_unet_glas", root, "debug=fast_dev_run", *unet, *RUN], tmp_path / "unet"))  # fmt: skip
    rows = check_summary(tmp_path / "unet")["metric_per_case"]
    assert all(0.0 <= row["object_f1"] <= 1.0 for row in rows)


def test_training_needs_instance_maps():
    module = oracle_module(torch.zeros(1, 4, 4), 1)
    with pytest.raises(ValueError, match="instances"):
        module.training_step({"image": torch.zeros(1, 1, 8, 8), "mask": torch.zeros(1, 1, 8, 8)}, 0)


@pytest.mark.slow
def test_the_decoder_learns_to_denoise_boxes():
    """Overfitting 8 synthetic images for 300 steps: at a low noise level the refined boxes overlap the reference
    boxes (mean IoU > 0.5; a random box in the image scores about 0.1)."""
    from diffseg_lightning.data.synthetic import SyntheticSegmentation

    torch.manual_seed(0)
    data = SyntheticSegmentation(num_cases=8, size=32, split="train", seed=1)
    items = [data[i] for i in range(8)]
    batch = {"image": torch.stack([i["image"] for i in items]), "instances": torch.stack([i["instances"] for i in items])}  # fmt: skip
    backbone = ResNetFPN(1, "basic", (1, 1, 1, 1), (8, 16, 32, 64), fpn_channels=16)
    net = GlandDiffusionNet(backbone, 1, fpn_channels=16, num_stages=2, nhead=2, dim_feedforward=32, dim_dynamic=4, mask_branch_channels=16, mask_branch_convs=1)  # fmt: skip
    kernel = GaussianKernel(1000, "cosine", objective="x0")
    sampler = DiffusionSampler(num_steps=2, solver=DDIM(eta=1.0, clip_x0=False))
    module = GlandDiffusionModule(net, kernel, sampler, optimizer=None, num_proposals=20)
    module.log_dict = lambda *args, **kwargs: None
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    for _ in range(300):
        loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()
    size = (32, 32)
    targets = [instance_boxes(inst) for inst in batch["instances"]]
    with torch.no_grad():
        x0 = torch.stack([module.boxes_to_signal_frac(module.padded_targets(b, size)) for b, _ in targets])
        t = torch.full((8,), 5)
        out = net.decode(module.signal_to_boxes(kernel.q_sample(x0, t), size), t, net.encode(batch["image"]))
    ious = [
        box_iou(out["boxes"][-1][b, : len(g)], g).diagonal() for b, (g, _) in enumerate(targets) if len(g)
    ]
    assert torch.cat(ious).mean() > 0.5


class FixedLogits(nn.Module):
    """A 'network' whose logits are two blobs, whatever the image."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))
        logits = torch.full((1, 1, 16, 16), -5.0)
        logits[..., 2:6, 2:6] = 5.0
        logits[..., 9:14, 8:15] = 5.0
        self.register_buffer("logits", logits)

    def forward(self, image):
        return self.logits.expand(image.shape[0], -1, -1, -1) + self.bias


def test_unet_baseline_splits_the_foreground_into_connected_components_and_scores_objects():
    from diffseg_lightning.methods.gland_diffusion import UNetInstanceModule

    module = UNetInstanceModule(FixedLogits(), optimizer=torch.optim.AdamW)
    out = module.sample(torch.zeros(2, 3, 16, 16))
    assert out["instances"].shape == (2, 16, 16) and out["instances"].unique().tolist() == [0, 1, 2]
    assert torch.equal(out["instances"] > 0, out["mask"][:, 0].bool())
    reference = torch.zeros(2, 16, 16, dtype=torch.long)
    reference[0] = out["instances"][0] * 7  # the same objects under other ids
    reference[1, 2:6, 2:6] = 1  # the second blob is missing from the reference
    batch = {"mask": (reference > 0).float()[:, None], "instances": reference, "case": ["a", "b"], "index": torch.arange(2)}  # fmt: skip
    rows = module.case_rows(out, batch)
    assert (
        rows[0]["object_f1"] == 1.0 and rows[0]["object_dice"] == 1.0 and rows[0]["object_hausdorff"] == 0.0
    )
    assert rows[1]["object_f1"] == pytest.approx(2 / 3) and rows[1]["num_objects_pred"] == 2.0
    with pytest.raises(ValueError, match="connectivity"):
        UNetInstanceModule(FixedLogits(), optimizer=torch.optim.AdamW, connectivity=3)
