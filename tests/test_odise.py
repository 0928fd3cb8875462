"""ODISE (Xu et al., CVPR 2023): score fusion, the zero-initialised captioner gate, Hungarian matching,
panoptic merge, PQ per seen / unseen category, the frozen backbone, and train + predict end to end."""

from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import compose_config
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest.importorskip("diffusers", reason="ODISE needs diffusers (pip install -e .[odise])")
pytest.importorskip("transformers", reason="ODISE needs transformers (pip install -e .[odise])")

from diffseg_lightning.data.synthetic_shapes import SyntheticShapes  # noqa: E402
from diffseg_lightning.diffusion.gaussian import GaussianKernel  # noqa: E402
from diffseg_lightning.methods.odise import (  # noqa: E402
    ODISEModule,
    fuse_class_probabilities,
    matching_cost,
    open_vocabulary_probabilities,
    panoptic_merge,
)
from diffseg_lightning.metrics.instances import hungarian_match  # noqa: E402
from diffseg_lightning.nets.odise import ImplicitCaptioner, ODISENet, build_odise_backbone  # noqa: E402
from diffseg_lightning.predict import predict  # noqa: E402
from diffseg_lightning.train import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def tiny_module() -> ODISEModule:
    backbone = build_odise_backbone(image_channels=3, seed=0)
    net = ODISENet(
        backbone, kernel=GaussianKernel(beta_start=0.00085, beta_end=0.012), num_queries=4, num_layers=1
    )
    return ODISEModule(net, torch.optim.AdamW, categories=NAMES, unseen=["triangle"])


# ------------------------------------------------------------------------------------------ fusion
def test_geometric_mean_fusion_by_hand_with_both_lambdas():
    p_diff = torch.tensor([0.5, 0.3, 0.2])
    p_clip = torch.tensor([0.2, 0.2, 0.6])
    seen = torch.tensor([True, True, False])
    fused = fuse_class_probabilities(p_diff, p_clip, seen)  # lambda 0.35 seen, 0.65 unseen
    by_hand = [0.5**0.65 * 0.2**0.35, 0.3**0.65 * 0.2**0.35, 0.2**0.35 * 0.6**0.65]
    torch.testing.assert_close(fused, torch.tensor(by_hand))
    # lambda = 0 is the diffusion head, lambda = 1 CLIP
    torch.testing.assert_close(
        fuse_class_probabilities(p_diff, p_clip, seen, 0.0, 1.0), torch.tensor([0.5, 0.3, 0.6])
    )


def test_final_probabilities_renormalise_the_fusion_and_keep_no_object():
    class_logits = torch.log(torch.tensor([[[0.4, 0.2, 0.2, 0.2]]]))  # softmax: p_null = 0.2
    clip_logits = torch.log(torch.tensor([[[0.25, 0.25, 0.5]]]))
    seen = torch.tensor([True, False, True])
    probs = open_vocabulary_probabilities(class_logits, clip_logits, seen)
    p_diff = np.array([0.5, 0.25, 0.25])  # the K category logits softmaxed alone
    lam = np.array([0.35, 0.65, 0.35])
    fused = p_diff ** (1 - lam) * np.array([0.25, 0.25, 0.5]) ** lam
    expected = np.append(fused / fused.sum() * 0.8, 0.2)
    np.testing.assert_allclose(probs[0, 0].numpy(), expected, rtol=1e-5)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_fusion_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="agree on K"):
        fuse_class_probabilities(torch.rand(3), torch.rand(2), torch.tensor([True, True, False]))


# ------------------------------------------------------------------------------------- captioner
def test_captioner_gate_starts_at_zero_so_tokens_are_the_empty_caption(tiny_module):
    captioner = ImplicitCaptioner(image_dim=6, seq_len=5, width=4)
    empty = torch.randn(1, 5, 4)
    assert not captioner.alpha.any()
    torch.testing.assert_close(captioner(torch.randn(3, 6), empty), empty.expand(3, -1, -1))
    with torch.no_grad():
        captioner.alpha.fill_(0.5)
    prefix = captioner.project(torch.ones(1, 6)).unsqueeze(1) + captioner.positional
    torch.testing.assert_close(captioner(torch.ones(1, 6), empty), empty + math.tanh(0.5) * prefix)
    net = tiny_module.net  # the whole net at initialisation: conditioned on the empty caption
    tokens = net.condition(torch.randn(2, net.backbone.embed_dim))
    torch.testing.assert_close(tokens, net.empty_tokens.expand(2, -1, -1))


# -------------------------------------------------------------------------------------- matching
def test_hungarian_matching_equals_brute_force():
    rng = np.random.default_rng(0)
    for n, m in [(4, 3), (5, 2), (3, 3)]:
        cost = torch.tensor(rng.normal(size=(n, m)))
        rows, cols = hungarian_match(cost)
        best = min(sum(cost[p[j], j].item() for j in range(m)) for p in itertools.permutations(range(n), m))
        assert cost[rows, cols].sum().item() == pytest.approx(best)
        assert len(set(rows.tolist())) == m and sorted(cols.tolist()) == list(range(m))


def test_matching_cost_by_pairwise_loop():
    torch.manual_seed(0)
    prob = torch.rand(3, 4).softmax(-1)
    logits = torch.randn(3, 10)
    classes = torch.tensor([2, 0])
    masks = (torch.rand(2, 10) > 0.5).float()
    cost = matching_cost(prob, logits, classes, masks, 2.0, 5.0, 5.0)
    for i in range(3):
        for j in range(2):
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[i], masks[j])
            s = logits[i].sigmoid()
            dice = 1 - (2 * (s * masks[j]).sum() + 1) / (s.sum() + masks[j].sum() + 1)
            assert cost[i, j].item() == pytest.approx(
                (-2 * prob[i, classes[j]] + 5 * bce + 5 * dice).item(), abs=1e-5
            )


# ---------------------------------------------------------------------------------- panoptic merge
def test_panoptic_merge_on_a_hand_case():
    """Mask2Former's rules on 4 x 4 pixels: best-scoring query per pixel, then the overlap test."""
    mask = torch.zeros(4, 4, 4)
    mask[0, :2, :2] = 0.9  # query 0: the top-left block, class 1, score 0.9
    mask[1] = 0.01  # query 1: class 0, score 0.85; faint everywhere (wins the pixels nobody claims) ...
    mask[1, :, 2:] = 0.8  # ... the right half ...
    mask[1, 0, 1] = 0.99  # ... and one pixel of query 0's block: 0.85 * 0.99 > 0.9 * 0.9
    mask[2, 2:, :2] = 1.0  # query 2: best class "no object" -> dropped
    mask[3, 3, :] = 0.9  # query 3: score 0.7, not above 0.8 -> dropped
    probs = torch.tensor([[0.05, 0.9, 0.05], [0.85, 0.1, 0.05], [0.05, 0.05, 0.9], [0.7, 0.2, 0.1]])
    # query 0 keeps 3 of its 4 pixels: 0.75 < 0.8 of its own area -> void; query 1 is segment 1
    segments, classes = panoptic_merge(probs, mask)
    right = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]])
    assert torch.equal(segments, right)
    assert torch.equal(classes, right)  # class 0 -> 1
    # a looser overlap threshold keeps query 0 (segment 1, class 1 -> 2); query 1 becomes segment 2
    segments, classes = panoptic_merge(probs, mask, overlap_threshold=0.7)
    left = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(segments, left + 2 * right)
    assert torch.equal(classes, 2 * left + right)
    nothing, none = panoptic_merge(probs, mask, object_threshold=0.95)
    assert not nothing.any() and not none.any()


# --------------------------------------------------------------------------------- frozen backbone
def test_frozen_backbone_gets_no_gradient_but_the_captioner_does(tiny_module):
    batch = SyntheticShapes(num_cases=2, size=32, categories=NAMES, unseen=["triangle"], split="train")
    items = [batch[i] for i in range(2)]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("image", "instances", "semantic")}
    module = tiny_module.train()
    module.zero_grad()
    out = module.net(batch["image"], module.seen_names)
    module.loss_terms(out["predictions"], module.targets(batch))["loss"].backward()
    backbone = module.net.backbone
    assert all(not p.requires_grad and p.grad is None for p in backbone.parameters())
    assert not backbone.training and not backbone.unet.training  # train() keeps it in eval mode
    assert module.net.captioner.alpha.grad is not None and module.net.captioner.alpha.grad.abs().sum() > 0
    assert module.net.decoder.embed.weight.grad.abs().sum() > 0
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert not trainable & {id(p) for p in backbone.parameters()}


def test_unknown_block_lists_the_valid_ones():
    backbone = build_odise_backbone(image_channels=3, seed=0)
    with pytest.raises(ValueError, match=r"unknown block.*up_blocks\.0"):
        ODISENet(backbone, blocks=["up_blocks.9"])


def test_bad_vocabulary_and_data_are_clear_errors(tiny_module):
    with pytest.raises(ValueError, match="proper subset"):
        ODISEModule(tiny_module.net, torch.optim.AdamW, categories=NAMES, unseen=["hexagon"])
    with pytest.raises(ValueError, match=r"lack \['semantic'\].*synthetic_shapes"):
        tiny_module.targets({"image": torch.zeros(1, 3, 32, 32), "instances": torch.zeros(1, 32, 32)})


def test_differentiable_extractor_gives_the_shared_extractors_features(tiny_module):
    """differentiable=True only switches autograd on: same hooks, noise, order and resizing."""
    from diffseg_lightning.features.extractor import DiffusionFeatureExtractor

    net = tiny_module.net
    ours = net.extractor
    shared = DiffusionFeatureExtractor(
        net.backbone.unet,
        ours.blocks,
        ours.timesteps,
        ours.kernel,
        noise_seed=ours.noise_seed,
        call=ours.call,
    )
    latent = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, *net.empty_tokens.shape[1:], requires_grad=True)
    features = ours(latent, encoder_hidden_states=context)
    torch.testing.assert_close(features.detach(), shared(latent, encoder_hidden_states=context.detach()))
    assert features.requires_grad  # the context's gradient path, which the shared extractor cuts
    features.sum().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0


def test_clip_scores_pool_the_dense_features_inside_each_mask(tiny_module):
    net = tiny_module.net
    dense = torch.zeros(1, 2, 2, 2)  # E = 2 on a 2 x 2 grid
    dense[0, 0, :, 0] = 1.0  # left column points along e_0
    dense[0, 1, :, 1] = 1.0  # right column along e_1
    masks = torch.full((1, 2, 2, 2), -30.0)
    masks[0, 0, :, 0] = 30.0  # query 0 covers the left column, query 1 everything
    masks[0, 1] = 30.0
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    scale = net.backbone.clip.logit_scale.exp().clamp(max=100).item()
    logits = net.clip_logits(masks, dense, text)
    by_hand = scale * torch.tensor([[1.0, 1 / math.sqrt(2)], [1 / math.sqrt(2), 1.0]])
    torch.testing.assert_close(logits[0], by_hand, atol=1e-4, rtol=1e-4)


def test_synthetic_shapes_hold_out_the_unseen_names_in_training():
    train_split = SyntheticShapes(num_cases=40, size=32, unseen=["triangle", "ring"], split="train")
    test_split = SyntheticShapes(num_cases=40, size=32, unseen=["triangle", "ring"], split="test")
    train_ids = set(torch.cat([train_split[i]["semantic"].unique() for i in range(40)]).tolist())
    test_ids = set(torch.cat([test_split[i]["semantic"].unique() for i in range(40)]).tolist())
    assert train_ids == {0, 1, 2, 4} and test_ids == {0, 1, 2, 3, 4, 5}  # triangle = 3, ring = 5
    item = test_split[3]
    assert torch.equal(item["image"], test_split[3]["image"])  # seeded per case
    assert torch.equal(item["mask"][0] > 0, item["instances"] > 0)
    assert torch.equal(item["semantic"] > 0, item["instances"] > 0)
    for segment in item["instances"].unique()[1:]:  # one category per segment
        assert item["semantic"][item["instances"] == segment].unique().numel() == 1
    with pytest.raises(ValueError, match="proper subset"):
        SyntheticShapes(unseen=["hexagon"])
    with pytest.raises(ValueError, match="categories"):
        SyntheticShapes(categories=["circle", "blob"], unseen=[])


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def odise_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("odise")
    overrides = [
        "experiment=odise_synthetic",
        "debug=fast_dev_run",
        "data.num_test=4",
        "data.eval_batch_size=4",
        "logger=csv",
        "~callbacks.progress_bar",
        "trainer.enable_model_summary=false",
    ]
    train(compose_config("train", overrides, out))
    return out


def test_fast_dev_run_writes_panoptic_metrics(odise_run):
    summary = json.loads((odise_run / "summary.json").read_text())
    for name in ("dice", "pq", "pq_seen", "pq_unseen", "miou"):
        assert name in summary["mean"]
    assert summary["num_cases"] == 4 and summary["sampler"]["unseen"] == ["triangle"]
    panoptic = summary["panoptic"]
    assert set(panoptic) >= {"all", "seen", "unseen", "per_category", "miou"}
    assert panoptic["per_category"]["triangle"]["seen"] is False
    assert panoptic["per_category"]["circle"]["seen"] is True


def test_predict_from_the_checkpoint(odise_run, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(inputs / "a.png")
    overrides = [
        f"ckpt_path={odise_run / 'checkpoints' / 'last.ckpt'}",
        f"input_dir={inputs}",
        f"output_dir={tmp_path / 'pred'}",
        "trainer.accelerator=cpu",
        "progress_bar=false",
        "overlay=false",
    ]
    result = predict(compose_config("predict", overrides, tmp_path))
    assert len(result["written"]) == 1 and not result["skipped"]
    assert (tmp_path / "pred" / "a_mask.png").is_file()


@pytest.mark.slow
def test_overfits_one_batch(tiny_module):
    """The whole trainable path learns: 200 AdamW steps on 4 training images drive the matched mask losses
    down and give an almost exact foreground (measured: BCE 2.05 -> 0.012, Dice loss 2.58 -> 0.05, Dice 0.99)."""
    torch.manual_seed(0)
    backbone = build_odise_backbone(image_channels=3, seed=0)
    net = ODISENet(backbone, kernel=GaussianKernel(beta_start=0.00085, beta_end=0.012), prompt="{}")
    cats = ["circle", "square", "triangle", "cross", "ring"]
    module = ODISEModule(net, torch.optim.AdamW, categories=cats, unseen=["triangle"])
    optimizer = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05
    )
    data = SyntheticShapes(num_cases=4, size=32, categories=cats, unseen=["triangle"], split="train")
    items = [data[i] for i in range(4)]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("image", "instances", "semantic", "mask")}
    first = None
    for _ in range(200):
        out = module.net(batch["image"], module.seen_names)
        losses = module.loss_terms(out["predictions"], module.targets(batch))
        first = first or {k: float(v.detach()) for k, v in losses.items()}
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert float(losses["bce"]) < first["bce"] / 10 and float(losses["dice"]) < first["dice"] / 10
    module.eval()
    prediction = module.sample(batch["image"])["mask"]
    dice = 2 * (prediction * batch["mask"]).sum() / (prediction.sum() + batch["mask"].sum())
    assert dice > 0.9
