"""Diffusion-based data augmentation for nuclei (Yu et al., MICCAI 2023): the nuclei structure and its
Hover-Net inversion, the eight swap / sign combinations, classifier-free guidance, the k-means label
fraction, the MoNuSeg-layout pair writer, and both methods (generators, Hover-Net) end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_config
from monai.apps.pathology.transforms.post.array import HoVerNetInstanceMapPostProcessing
from monai.transforms import ComputeHoVerMaps
from torch import nn

from diffseg_lightning.data import SyntheticSegmentation
from diffseg_lightning.data.monuseg import MoNuSeg
from diffseg_lightning.data.nuclei_aug import AugmentedNuclei, KMeansLabelFraction, kmeans_subset
from diffseg_lightning.diffusion import BernoulliKernel, GaussianKernel
from diffseg_lightning.diffusion.solvers import DDIM, BernoulliPosterior
from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.inference.sampler import DiffusionSampler
from diffseg_lightning.methods.hovernet import HoVerNetModule
from diffseg_lightning.methods.nuclei_aug import NucleiAugmentationModule, classifier_free_guidance
from diffseg_lightning.synthesize import synthesize, write_pair
from diffseg_lightning.utils.hover import (
    COMBINATIONS,
    combination_variants,
    hover_maps,
    instances_from_hover,
    instances_from_structure,
    structure_from_instances,
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Parameter `min_size` is deprecated"),
]

RUN = ["debug=fast_dev_run", "logger=csv", "~callbacks.progress_bar", "trainer.enable_model_summary=false"]


def discs(centres, radius, size=48) -> np.ndarray:
    """An (size, size) int64 instance map of discs (later discs win where they overlap)."""
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((size, size), np.int64)
    for k, (r, c) in enumerate(centres, start=1):
        out[(yy - r) ** 2 + (xx - c) ** 2 <= radius**2] = k
    return out


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label maps are equal up to renaming the labels (0 stays background)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.fixture(scope="module")
def hand_made() -> torch.Tensor:
    """Three 48 px maps: four separate discs; three discs, two of them touching; one big disc."""
    return torch.from_numpy(
        np.stack(
            [
                discs([(10, 10), (10, 30), (32, 14), (34, 36)], 6),
                discs([(24, 14), (24, 26), (12, 38)], 6),  # centres 12 apart, radius 6: they touch
                discs([(20, 20)], 8),
            ]
        )
    )


# ------------------------------------------------------------------------------------------ the structure
def test_hover_maps_hand_computed_values():
    instances = torch.zeros(3, 7, dtype=torch.long)
    instances[1, 1:6] = 4  # one row of 5 pixels, centroid column 3
    instances[0, 6] = 9  # a single pixel: offsets 0
    maps = hover_maps(instances)
    assert torch.equal(maps[0, 1, 1:6], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))  # h: (c - 3) / 2
    assert torch.equal(maps[1, 1, 1:6], torch.zeros(5))  # v: one row, every offset 0
    assert maps[:, 0, 6].abs().sum() == 0 and maps[:, 2].abs().sum() == 0  # the single pixel, background
    structure = structure_from_instances(instances)
    assert torch.equal(structure[0], torch.where(instances > 0, 1.0, -1.0))
    with pytest.raises(ValueError, match=">= 0"):
        hover_maps(-instances)
    with pytest.raises(ValueError, match="integer"):
        hover_maps(instances.float())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        instances_from_structure(structure)  # (3, H, W): no batch dimension


def test_hover_maps_equal_monai_compute_hover_maps_batched():
    data = SyntheticSegmentation(num_cases=4, size=40, max_shapes=8)
    instances = torch.stack([data[i]["instances"] for i in range(4)])
    instances[0][instances[0] == 1] = 17  # ids need not be consecutive
    reference = torch.stack([torch.as_tensor(ComputeHoVerMaps()(m[None].numpy())) for m in instances])
    assert torch.allclose(hover_maps(instances), reference.float(), atol=1e-6)


def test_round_trip_recovers_the_hand_made_instances(hand_made):
    recovered, combination = instances_from_structure(structure_from_instances(hand_made))
    assert combination.tolist() == [0, 0, 0]  # the identity wins on a correct structure
    for got, expected in zip(recovered.numpy(), hand_made.numpy(), strict=True):
        assert same_partition(got, expected)


def test_batched_inversion_equals_monai_postprocessing_image_by_image():
    data = SyntheticSegmentation(num_cases=5, size=48, max_shapes=8)
    structure = structure_from_instances(torch.stack([data[i]["instances"] for i in range(5)]))
    structure[:, 1:] += 0.05 * torch.randn(structure[:, 1:].shape, generator=torch.Generator().manual_seed(0))
    ours = instances_from_hover((structure[:, 0] + 1) / 2, structure[:, 1:])
    monai = HoVerNetInstanceMapPostProcessing(activation=lambda x: x, mask_threshold=0.5)
    for i in range(5):
        _, reference = monai(((structure[i, :1] + 1) / 2).numpy(), structure[i, 1:].numpy())
        assert same_partition(ours[i].numpy(), np.asarray(reference)[0])


@pytest.mark.parametrize("k", range(8))
def test_a_swapped_or_flipped_structure_is_repaired(hand_made, k):
    structure = structure_from_instances(hand_made)
    broken = combination_variants(structure)[:, k]
    as_is, _ = instances_from_structure(broken, try_combinations=False)
    recovered, chosen = instances_from_structure(broken)
    if k > 0:  # a wrong orientation loses instances when inverted as it is
        assert (as_is.flatten(1).amax(1) < hand_made.flatten(1).amax(1)).all()
    for got, expected in zip(recovered.numpy(), hand_made.numpy(), strict=True):
        assert same_partition(got, expected)
    repaired = combination_variants(broken)[torch.arange(3), chosen]
    assert torch.equal(repaired, structure)  # the kept combination undoes the damage exactly
    assert len(COMBINATIONS) == 8


# ------------------------------------------------------------------------------------ guidance, stage 2
def test_classifier_free_guidance_hand_computation():
    conditional, unconditional = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.5, 1.0, 1.0])
    # u + s (c - u) with s = 2: 0.5 + 2 * 0.5, 1 + 2 * 1, 1 + 2 * (-2)
    assert torch.equal(
        classifier_free_guidance(conditional, unconditional, 2.0), torch.tensor([1.5, 3.0, -3.0])
    )
    assert torch.equal(classifier_free_guidance(conditional, unconditional, 1.0), conditional)
    assert torch.equal(classifier_free_guidance(conditional, unconditional, 0.0), unconditional)


class _CountingSpade(nn.Module):
    """A stand-in image network: output = x * (1 + mean of seg) + t / 1000; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, x, timesteps, seg):
        self.calls += 1
        return (
            self.weight * x * (1 + seg.mean(dim=(1, 2, 3), keepdim=True))
            + timesteps[:, None, None, None] / 1000
        )


def _generator_module(image_net: nn.Module, cond_drop_prob: float = 0.2) -> NucleiAugmentationModule:
    return NucleiAugmentationModule(
        structure_net=nn.Identity(),
        image_net=image_net,
        optimizer=torch.optim.Adam,
        kernel=GaussianKernel(),
        cond_drop_prob=cond_drop_prob,
    )


def test_guided_output_runs_conditional_and_null_rows_in_one_pass():
    net = _CountingSpade()
    module = _generator_module(net)
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([10, 500, 999])
    structure = torch.rand(3, 3, 8, 8) + 0.5
    with torch.no_grad():
        guided = module.guided_image_output(x, t, structure, 2.0)
        assert net.calls == 1
        expected = classifier_free_guidance(net(x, t, structure), net(x, t, torch.zeros_like(structure)), 2.0)
    assert torch.allclose(guided, expected)


def test_condition_dropping_rate():
    structure = torch.ones(20000, 3, 1, 1)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(
        _generator_module(_CountingSpade(), 0.0).drop_condition(structure, generator), structure
    )
    assert _generator_module(_CountingSpade(), 1.0).drop_condition(structure, generator).abs().sum() == 0
    dropped = (
        _generator_module(_CountingSpade(), 0.2).drop_condition(structure, generator)[:, 0, 0, 0] == 0
    ).float()
    # binomial(20000, 0.2): standard deviation of the fraction 0.0028; 5 sigma
    assert abs(dropped.mean().item() - 0.2) < 5 * (0.2 * 0.8 / 20000) ** 0.5
    with pytest.raises(ValueError, match="stage"):
        NucleiAugmentationModule(
            nn.Identity(), _CountingSpade(), torch.optim.Adam, GaussianKernel(), stage="all"
        )


class _StructureNet(nn.Module):
    """A stand-in structure network with a weight: ``w * x + t / 1000``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((), 0.5))

    def forward(self, x, timesteps):
        return self.weight * x + timesteps[:, None, None, None] / 1000


def test_training_loss_draws_timesteps_noise_then_the_dropped_condition():
    """Both stages' losses by hand with the same draws in the same order: per stage t, then the noise, then
    (image stage) the condition dropping; each the kernel's epsilon MSE."""
    module = NucleiAugmentationModule(
        _StructureNet(), _CountingSpade(), torch.optim.Adam, GaussianKernel(), cond_drop_prob=0.5
    )
    module.log_dict = lambda *args, **kwargs: None
    instances = torch.zeros(4, 8, 8, dtype=torch.long)
    instances[:, 1:4, 1:5], instances[:, 5:8, 4:7] = 1, 2
    batch = {"image": torch.rand(4, 3, 8, 8) * 255, "instances": instances}
    torch.manual_seed(11)
    loss = module.training_step(batch, 0)

    structure, image = module.stage_targets(batch)
    kernel = module.kernel
    torch.manual_seed(11)
    expected = []
    for x0, net in ((structure, module.structure_net), (image, None)):
        t = torch.randint(0, 1000, (4,))
        noise = torch.randn(x0.shape)
        x_t = kernel.q_sample(x0, t, noise=noise)
        if net is None:
            keep = (torch.rand(4) >= 0.5).float()[:, None, None, None]
            out = module.image_net(x_t, t, structure * keep)
        else:
            out = net(x_t, timesteps=t)
        expected.append(((out - noise) ** 2).mean())
    # float32, the same operations in the same order
    torch.testing.assert_close(loss, expected[0] + expected[1], rtol=1e-6, atol=1e-7)


def test_generation_takes_the_samplers_solver_and_reports_it():
    sampler = DiffusionSampler(num_steps=3, seed=2, solver=DDIM(eta=0.5))
    module = NucleiAugmentationModule(
        nn.Identity(), _CountingSpade(), torch.optim.Adam, GaussianKernel(), sampler
    )
    assert module.solver is sampler.solver
    settings = module.inference_settings()
    assert settings["update"] == "ddim" and settings["deterministic"] is False
    assert settings["solver"] == {"eta": 0.5, "clip_x0": True} and settings["num_steps"] == 3
    # no sampler: the kernel's default solver (DDIM, eta 0), deterministic
    default = _generator_module(_CountingSpade()).inference_settings()
    assert default["update"] == "ddim" and default["deterministic"] is True
    with pytest.raises(ConfigError, match="noise=gaussian"):
        NucleiAugmentationModule(nn.Identity(), _CountingSpade(), torch.optim.Adam, BernoulliKernel())
    with pytest.raises(ConfigError, match="sampler=ddim"):  # a solver of another kernel
        NucleiAugmentationModule(
            nn.Identity(), _CountingSpade(), torch.optim.Adam, GaussianKernel(),
            DiffusionSampler(solver=BernoulliPosterior()),
        )  # fmt: skip


def test_spade_middle_block_is_conditioned_on_the_structure():
    from diffseg_lightning.nets.nuclei_spade import SPADEMiddleDiffusionUNet

    options = dict(channels=[8, 16], attention_levels=[False, True], num_res_blocks=1, num_head_channels=8)
    net = SPADEMiddleDiffusionUNet(2, 3, 3, 3, norm_num_groups=8, spade_intermediate_channels=16, **options)
    with torch.no_grad():  # MONAI zero-initialises each block's last convolution: perturb it away from that
        for parameter in net.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)))
    middle = []
    net.middle_block.register_forward_hook(lambda module, args, out: middle.append(out))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    seg = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        out = net(x, t, seg)
        net(x, t, seg.flip(-1))
    assert out.shape == x.shape
    assert not torch.allclose(middle[0], middle[1])  # the middle block's output depends on the structure
    with pytest.raises(RuntimeError, match="SPADE middle block"):
        net.middle_block.resnet_1(torch.zeros(1, 16, 8, 8), torch.zeros(1, 32))


# ------------------------------------------------------------------------------------------ label fraction
def test_kmeans_subset_takes_the_central_members_of_every_cluster():
    rng = np.random.default_rng(0)
    centres = np.eye(6) * 50.0
    features = np.concatenate([c + rng.normal(size=(10, 6)) for c in centres])  # 6 clusters of 10
    chosen = kmeans_subset(features, 0.2, k=6, seed=0)
    assert len(chosen) == 12
    cluster = chosen // 10
    assert np.array_equal(np.bincount(cluster, minlength=6), np.full(6, 2))  # two from every cluster
    # brute force: the two chosen of each cluster are its two members nearest to the (standardised) centroid
    z = (features - features.mean(0)) / features.std(0)
    for c in range(6):
        members = np.arange(10 * c, 10 * c + 10)
        distance = ((z[members] - z[members].mean(0)) ** 2).sum(1)
        assert set(chosen[cluster == c]) == set(members[np.argsort(distance)[:2]])
    assert np.array_equal(kmeans_subset(features, 1.0), np.arange(60))
    few = kmeans_subset(features, 0.05, k=6, seed=0)  # 3 images for 6 clusters: 3 clusters give one each
    assert len(few) == 3 and len(set((few // 10).tolist())) == 3
    with pytest.raises(ValueError, match="fraction"):
        kmeans_subset(features, 0.0)


def test_label_fraction_wrapper_renumbers_items():
    data = SyntheticSegmentation(num_cases=24, size=16, channels=3)
    subset = KMeansLabelFraction(data, fraction=0.5, k=6, seed=0)
    assert 6 <= len(subset) <= 18 and len(set(subset.selected.tolist())) == len(subset)
    item = subset[1]
    assert int(item["index"]) == 1 and item["case"] == data.case_name(int(subset.selected[1]))


# ------------------------------------------------------------------------------------ MoNuSeg-layout pairs
def test_written_pairs_read_back_with_the_monuseg_loader(tmp_path, hand_made):
    rng = np.random.default_rng(0)
    for i, instances in enumerate(hand_made.numpy()):
        image = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
        assert write_pair(tmp_path, f"pair_{i}", image, instances, 0.252) == instances.max()
    data = MoNuSeg(tmp_path, split="train", size=None, val_fraction=0.0)
    assert len(data) == 3
    for i in range(3):
        item = data[i]
        assert same_partition(item["instances"].numpy(), hand_made[i].numpy())
        assert item["image"].shape == (3, 48, 48)
        assert torch.allclose(item["spacing"], torch.tensor([0.252, 0.252]))


# ------------------------------------------------------------------------------------ Hover-Net method
class _OracleHover(nn.Module):
    """Returns the exact NP logits and HV maps of a fixed instance map (a perfect Hover-Net)."""

    def __init__(self, instances: torch.Tensor) -> None:
        super().__init__()
        self.instances = instances
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        sign = (self.instances > 0).float() * 2 - 1  # +1 nucleus, -1 background
        logits = torch.stack([-sign, sign], 1) * 10 * self.scale
        return {"nucleus_prediction": logits, "horizontal_vertical": hover_maps(self.instances)}


def test_hovernet_module_scores_a_perfect_prediction(hand_made):
    module = HoVerNetModule(_OracleHover(hand_made), torch.optim.Adam)
    batch = {
        "image": torch.zeros(3, 3, 48, 48),
        "mask": (hand_made > 0).float()[:, None],
        "instances": hand_made,
        "case": ["a", "b", "c"],
        "index": torch.arange(3),
    }
    out = module.sample(batch["image"])
    rows = module.case_rows(out, batch)
    for row, instances in zip(rows, hand_made, strict=True):
        assert row["dice"] == 1.0 and row["aji"] == 1.0 and row["pq"] == 1.0 and row["f1"] == 1.0
        assert row["num_instances"] == instances.max()
    targets = HoVerNetModule.targets(hand_made)
    assert torch.equal(targets["nucleus_prediction"].argmax(1), (hand_made > 0).long())
    loss = module.loss(module(batch["image"]), targets)  # MONAI's HoVerNetLoss on exact outputs
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def generator_run(tmp_path_factory):
    from diffseg_lightning.train import train

    out = tmp_path_factory.mktemp("nuclei_aug")
    train(compose_config("train", ["experiment=nuclei_aug_synthetic", "data.batch_size=4", *RUN], out))
    return out


def test_generators_fast_dev_run_summary(generator_run):
    summary = json.loads((generator_run / "summary.json").read_text())
    assert {"structure_mse", "image_mse", "denoising_mse"} <= set(summary["mean"])
    assert summary["sampler"]["guidance_scale"] == 2.0 and summary["num_cases"] >= 1
    assert np.isfinite(summary["mean"]["denoising_mse"])


def test_synthesize_writes_pairs_the_augmented_set_reads(generator_run, tmp_path):
    out = tmp_path / "pairs"
    overrides = [
        f"ckpt_path={generator_run / 'checkpoints' / 'last.ckpt'}",
        f"structure_ckpt_path={generator_run / 'checkpoints' / 'last.ckpt'}",  # stage 1 from a run of its own
        "n=3",
        "batch_size=2",
        "num_steps=2",
    ]
    record = synthesize(
        compose_config("synthesize", [*overrides, f"output_dir={out}", "device=cpu"], tmp_path)
    )
    assert record["n"] == 3 and record["seconds_per_pair"] > 0
    pairs = MoNuSeg(out, split="train", size=None, val_fraction=0.0)
    assert len(pairs) == 3 and pairs[0]["image"].shape == (3, 32, 32)
    real = SyntheticSegmentation(num_cases=6, size=32, channels=3)
    augmented = AugmentedNuclei(real, synthetic_root=out, size=32)
    assert len(augmented) == 9
    assert [int(augmented[i]["index"]) for i in range(9)] == list(range(9))
    assert (
        augmented[8]["case"].endswith("synthetic_00002.tif")
        and augmented[8]["instances"].dtype == torch.int64
    )


def test_synthesize_refuses_a_checkpoint_of_another_method(hovernet_run, generator_run, tmp_path):
    from diffseg_lightning.utils.errors import DiffSegError

    ckpt = generator_run / "checkpoints" / "last.ckpt"
    other = hovernet_run / "checkpoints" / "last.ckpt"
    with pytest.raises(DiffSegError, match="no structure_net weights"):
        synthesize(
            compose_config("synthesize", [f"ckpt_path={ckpt}", f"structure_ckpt_path={other}"], tmp_path)
        )
    with pytest.raises(DiffSegError, match="NucleiAugmentationModule"):
        synthesize(
            compose_config(
                "synthesize", [f"ckpt_path={hovernet_run / 'checkpoints' / 'last.ckpt'}"], tmp_path
            )
        )


SMALL_HOVER = [
    "model=hovernet",
    "model.net._target_=diffseg_lightning.nets.hover_unet.HoVerUNet",
    "~model.net.mode",
    "~model.net.np_out_channels",
    "~model.net.out_classes",
    "~model.net.decoder_padding",
    "~model.net.dropout_prob",
    "+model.net.channels=[8,16]",
    "+model.net.strides=[2]",
    "+model.net.num_res_units=1",
    "data.channels=3",
    "data.size=32",
    "data.batch_size=4",
    "data.eval_batch_size=4",
]


@pytest.fixture(scope="module")
def hovernet_run(tmp_path_factory):
    from diffseg_lightning.train import train

    out = tmp_path_factory.mktemp("hovernet")
    train(compose_config("train", [*SMALL_HOVER, *RUN], out))
    return out


def test_hovernet_fast_dev_run_reports_instance_metrics_and_predicts(hovernet_run, tmp_path):
    from PIL import Image

    from diffseg_lightning.predict import predict

    summary = json.loads((hovernet_run / "summary.json").read_text())
    assert {"dice", "aji", "pq", "dq", "sq", "object_dice", "f1"} <= set(summary["mean"])
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
        inputs / "a.png"
    )
    overrides = [f"ckpt_path={hovernet_run / 'checkpoints' / 'last.ckpt'}", f"input_dir={inputs}"]
    result = predict(
        compose_config(
            "predict", [*overrides, f"output_dir={tmp_path / 'pred'}", "progress_bar=false"], tmp_path
        )
    )
    assert len(result["written"]) == 1 and (tmp_path / "pred" / "a_mask.png").is_file()


@pytest.mark.slow
def test_monai_hovernet_fast_dev_run(tmp_path):
    """The paper's network (MONAI HoVerNet, 256 px, 33.6M parameters): about 2 minutes on a busy 2-core CPU."""
    from diffseg_lightning.train import train

    overrides = [
        "model=hovernet",
        "data.channels=3",
        "data.size=256",
        "data.batch_size=1",
        "data.eval_batch_size=1",
    ]
    train(compose_config("train", [*overrides, *RUN], tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "aji" in summary["mean"] and summary["network"]["parameters"] > 30_000_000


def write_monuseg_replica(root, n_train: int = 6, n_test: int = 2, size: int = 64) -> None:
    """A MoNuSeg-layout replica: ``n_train`` training and ``n_test`` test images of random discs."""
    rng = np.random.default_rng(1)
    for i in range(n_train + n_test):
        centres = rng.integers(8, size - 8, size=(6, 2)).tolist()
        instances = discs(centres, 5, size)
        image = np.where((instances > 0)[..., None], [80, 40, 120], [230, 200, 220]).astype(np.uint8)
        image = (image + rng.integers(0, 20, image.shape)).astype(np.uint8)
        write_pair(root, f"TCGA-{i:02d}", image, instances, 0.252)
    test = root / "MoNuSegTestData"
    test.mkdir()
    for i in range(n_train, n_train + n_test):
        for folder, suffix in (("Tissue Images", "tif"), ("Annotations", "xml")):
            (root / folder / f"TCGA-{i:02d}.{suffix}").rename(test / f"TCGA-{i:02d}.{suffix}")


TINY_GENERATORS = [
    "model.structure_net.channels=[8,16]",
    "model.structure_net.attention_levels=[false,true]",
    "model.structure_net.num_res_blocks=1",
    "model.structure_net.num_head_channels=8",
    "model.structure_net.norm_num_groups=8",
    "model.image_net.channels=[8,16]",
    "model.image_net.attention_levels=[false,true]",
    "model.image_net.num_res_blocks=1",
    "model.image_net.num_head_channels=8",
    "model.image_net.norm_num_groups=8",
    "model.image_net.spade_intermediate_channels=16",
]


def test_paper_experiments_run_on_a_monuseg_replica(tmp_path, generator_run):
    """experiment=nuclei_aug (generators) and experiment=nuclei_aug_hovernet (a label fraction + synthetic
    pairs) with their data settings as written, networks and crops cut to seconds."""
    from diffseg_lightning.train import train

    root = tmp_path / "MoNuSeg"
    write_monuseg_replica(root)
    data = [
        f"data.root={root}",
        "data.size=32",
        "data.crop_size=32",
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "data.num_workers=0",
    ]
    train(compose_config("train", ["experiment=nuclei_aug", *data, *TINY_GENERATORS, *RUN], tmp_path / "gen"))
    summary = json.loads((tmp_path / "gen" / "summary.json").read_text())
    assert (
        summary["num_cases"] == 2 and summary["sampler"]["guidance_scale"] == 2.0
    )  # fast_dev_run: 1 batch of 2 tiles
    pairs = tmp_path / "pairs"
    synthesize(
        compose_config(
            "synthesize",
            [
                f"ckpt_path={tmp_path / 'gen' / 'checkpoints' / 'last.ckpt'}",
                "experiment=nuclei_aug",
                "n=2",
                "num_steps=2",
                f"output_dir={pairs}",
                "device=cpu",
            ],
            tmp_path,
        )
    )
    hover = [o for o in SMALL_HOVER if not o.startswith(("model=", "data."))]
    overrides = [
        "experiment=nuclei_aug_hovernet",
        *data,
        *hover,
        "data.label_fraction=0.5",
        f"data.synthetic_root={pairs}",
    ]
    train(compose_config("train", [*overrides, *RUN], tmp_path / "hover"))
    splits = json.loads((tmp_path / "hover" / "splits.json").read_text())
    assert splits["train"]["items"] == 3 + 2  # round(0.5 x 5) training images (val takes 1 of 6) + 2 pairs
    assert "aji" in json.loads((tmp_path / "hover" / "summary.json").read_text())["mean"]
