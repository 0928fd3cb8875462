"""Tests of the MedSegDiff-V2 denoiser (diffseg_lightning.nets.medsegdiff_v2): the denoiser contract, the
anchor condition (U-SA with a learnable Gaussian kernel), the SS-Former's spectrum-space attention and
NBP-Filter, and end-to-end runs with both noise kernels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import compose_config
from scipy.ndimage import gaussian_filter
from torch import nn

from diffseg_lightning.nets.medsegdiff_v2 import (
    MedSegDiffV2UNet,
    NeuralBandPassFilter,
    SpectrumSpaceAttention,
    UncertainSpatialAttention,
    band_pass_tokens,
    gaussian_kernel1d,
)
from diffseg_lightning.utils import CONFIG_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    base_channels=8,
    channel_mults=(1, 2),
    attention_levels=(False, True),
    num_heads=2,
    ssformer_blocks=2,
    ssformer_heads=2,
    nbp_hidden=8,
    nbp_blocks=1,
    anchor_kernel_size=5,
)


def tiny_net(**kwargs) -> MedSegDiffV2UNet:
    torch.manual_seed(0)
    return MedSegDiffV2UNet(**{**TINY, **kwargs})


def perturb_output_conv(net: MedSegDiffV2UNet, std: float = 0.1) -> None:
    """Move the zero-initialised output convolution off zero, as training does."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in net.out[-1].parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def inputs(batch: int, image_channels: int, mask_channels: int, h: int, w: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, mask_channels, h, w, generator=gen)
    image = torch.randn(batch, image_channels, h, w, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return x_t, t, image


# ---------------------------------------------------------------------------- shapes and errors
@pytest.mark.parametrize(("image_channels", "size"), [(1, (32, 32)), (3, (16, 48)), (4, (32, 16))])
def test_output_and_condition_shapes(image_channels: int, size: tuple[int, int]) -> None:
    net = tiny_net(image_channels=image_channels)
    x_t, t, image = inputs(2, image_channels, 1, *size)
    cond = net.encode_condition(image)
    assert {k: tuple(v.shape) for k, v in cond.items()} == net.cond_shapes(2, *size)
    assert cond["semantic"].shape == (2, 16, size[0] // 2, size[1] // 2)
    assert net(x_t, t, cond).shape == (2, 1, *size)


def test_multiclass_learned_variance_scalar_t_and_narrow_condition_model() -> None:
    net = tiny_net(image_channels=4, mask_channels=3, out_channels=6, cond_channels=4)
    x_t, t, image = inputs(2, 4, 3, 16, 32)
    cond = net.encode_condition(image)
    assert cond["anchor_logits"].shape == (2, 3, 16, 32)  # one anchor channel per class
    assert cond["semantic"].shape == (2, 16, 8, 16)  # condition width 8 projected to the bottleneck's 16
    assert isinstance(net.semantic_proj, nn.Conv2d)
    assert net(x_t, t, cond).shape == (2, 6, 16, 32)
    assert net(x_t, t.float(), cond).shape == (2, 6, 16, 32)
    assert net(x_t, 7, cond).shape == (2, 6, 16, 32)


def test_bad_inputs_raise_clear_errors() -> None:
    net = tiny_net(image_channels=3)
    with pytest.raises(ValueError, match="expected 3 image channels, got 1"):
        net.encode_condition(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(31, 32\).*factor 2"):
        net.encode_condition(torch.zeros(1, 3, 31, 32))
    x_t, t, image = inputs(2, 3, 1, 32, 32)
    cond = net.encode_condition(image)
    with pytest.raises(ValueError, match=r"\(32, 33\).*factor 2"):
        net(torch.zeros(2, 1, 32, 33), t, cond)
    with pytest.raises(ValueError, match="encode_condition"):
        net(x_t, t, image)  # the raw image is not the cached condition
    with pytest.raises(ValueError, match="encode_condition"):
        net(x_t, t, net.encode_condition(image[:1]))  # batch mismatch
    with pytest.raises(ValueError, match="encode_condition"):
        net(x_t, t, {k: v for k, v in cond.items() if k != "semantic"})
    with pytest.raises(ValueError, match="timesteps"):
        net(x_t, t[:1], cond)
    with pytest.raises(ValueError, match="mask channels"):
        net(torch.zeros(2, 2, 32, 32), t, cond)


def test_hyperparameter_validation_and_hydra_lists() -> None:
    from omegaconf import OmegaConf

    with pytest.raises(ValueError, match="one flag per level"):
        MedSegDiffV2UNet(channel_mults=(1, 2), attention_levels=(False, False, True))
    with pytest.raises(ValueError, match="ssformer_heads"):
        MedSegDiffV2UNet(base_channels=6, channel_mults=(1,), attention_levels=(False,), ssformer_heads=4)
    with pytest.raises(ValueError, match="kernel_size must be a positive odd"):
        MedSegDiffV2UNet(**{**TINY, "anchor_kernel_size": 4})
    with pytest.raises(ValueError, match="sigma must be > 0"):
        MedSegDiffV2UNet(**{**TINY, "anchor_sigma": 0.0})
    with pytest.raises(ValueError, match="ssformer_blocks must be >= 1"):
        MedSegDiffV2UNet(**{**TINY, "ssformer_blocks": 0})
    with pytest.raises(ValueError, match="nbp_blocks must be >= 1"):
        MedSegDiffV2UNet(**{**TINY, "nbp_blocks": 0})
    cfg = OmegaConf.create({"mults": [1, 2], "attn": [False, False]})
    net = MedSegDiffV2UNet(**{**TINY, "channel_mults": cfg.mults, "attention_levels": cfg.attn})
    assert net.channel_mults == (1, 2) and net.downsample_factor == 2


# ---------------------------------------------------------------------------- the contract
def test_every_parameter_gets_a_gradient() -> None:
    net = tiny_net(image_channels=3, mask_channels=2, cond_channels=4, num_res_blocks=2)
    perturb_output_conv(net)
    x_t, t, image = inputs(2, 3, 2, 16, 16)
    target = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(5))
    F.mse_loss(net(x_t, t, net.encode_condition(image)), target).backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"parameters without gradient: {missing}"
    assert net.usa.log_sigma.grad.abs().min() > 0  # the learnable Gaussian std is trained


def test_deterministic_under_a_seed() -> None:
    x_t, t, image = inputs(2, 1, 1, 16, 16)
    outs = []
    for _ in range(2):
        net = tiny_net()
        perturb_output_conv(net)
        with torch.no_grad():
            outs += [net(x_t, t, net.encode_condition(image)), net(x_t, t, net.encode_condition(image))]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)


def test_cached_condition_equals_uncached_and_repeats_exactly() -> None:
    net = tiny_net().eval()
    perturb_output_conv(net)
    x1, t1, image = inputs(2, 1, 1, 16, 32, seed=1)
    x2, t2, _ = inputs(2, 1, 1, 16, 32, seed=2)
    with torch.no_grad():
        cond = net.encode_condition(image)  # once, reused for two steps
        for x_t, t in ((x1, t1), (x2, t2)):
            cached = net(x_t, t, cond)
            torch.testing.assert_close(cached, net.forward_with_image(x_t, t, image), rtol=0, atol=0)
            assert cached.abs().max() > 0
        s = 3  # S samples per image, batched, as the sampler repeats the condition
        cond_rep = {k: v.repeat_interleave(s, dim=0) for k, v in cond.items()}
        image_rep = image.repeat_interleave(s, dim=0)
        fresh = net.encode_condition(image_rep)
        for key in cond_rep:
            torch.testing.assert_close(cond_rep[key], fresh[key], rtol=1e-5, atol=1e-6)
        x_rep = torch.randn(2 * s, 1, 16, 32, generator=torch.Generator().manual_seed(9))
        t_rep = t1.repeat_interleave(s)
        torch.testing.assert_close(
            net(x_rep, t_rep, cond_rep), net(x_rep, t_rep, fresh), rtol=1e-5, atol=1e-6
        )


def test_forward_creates_no_module(monkeypatch) -> None:
    net = tiny_net()
    x_t, t, image = inputs(2, 1, 1, 16, 16)
    params_before = {name: id(p) for name, p in net.named_parameters()}
    keys_before = list(net.state_dict())
    calls = []
    original = nn.Module.__init__

    def counting_init(self, *args, **kwargs):
        calls.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "__init__", counting_init)
    out = net(x_t, t, net.encode_condition(image))
    out.sum().backward()
    monkeypatch.setattr(nn.Module, "__init__", original)
    assert calls == [], f"modules built inside encode_condition/forward: {calls}"
    assert {name: id(p) for name, p in net.named_parameters()} == params_before
    assert list(net.state_dict()) == keys_before


def test_timestep_and_both_conditions_change_the_output() -> None:
    net = tiny_net().eval()
    perturb_output_conv(net)
    x_t, _, image = inputs(2, 1, 1, 16, 16)
    t = torch.tensor([10, 10])
    with torch.no_grad():
        cond = net.encode_condition(image)
        base = net(x_t, t, cond)
        assert (base - net(x_t, torch.tensor([900, 900]), cond)).abs().max() > 1e-5
        gate = {**cond, "anchor_gate": torch.rand_like(cond["anchor_gate"])}
        assert (base - net(x_t, t, gate)).abs().max() > 1e-5  # anchor condition is live
        semantic = {**cond, "semantic": torch.randn_like(cond["semantic"])}
        assert (base - net(x_t, t, semantic)).abs().max() > 1e-5  # semantic condition is live


def test_anchor_gates_the_first_encoder_stage() -> None:
    """f_d'^0 = gate . f_d^0 + f_d^0 on the output of encoder level 0; level 1 and the skip read it."""
    net = tiny_net().eval()
    x_t, t, image = inputs(2, 1, 1, 16, 16)
    seen = {}
    net.enc[0].register_forward_hook(lambda m, i, o: seen.__setitem__("f_d0", o))
    net.mask_down[0].register_forward_pre_hook(lambda m, i: seen.__setitem__("into_level1", i[0]))
    with torch.no_grad():
        cond = net.encode_condition(image)
        net(x_t, t, cond)
    expected = seen["f_d0"] * cond["anchor_gate"] + seen["f_d0"]
    torch.testing.assert_close(seen["into_level1"], expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------- U-SA: learnable Gaussian kernel
@pytest.mark.parametrize("sigma", [0.6, 1.0, 1.7])
def test_learnable_gaussian_matches_scipy(sigma: float) -> None:
    usa = UncertainSpatialAttention(2, kernel_size=7, sigma=1.0)
    with torch.no_grad():
        usa.log_sigma.copy_(torch.log(torch.tensor([sigma, 2 * sigma])))  # per-class sigma, after "training"
    gen = torch.Generator().manual_seed(0)
    prob = torch.rand(2, 2, 13, 17, generator=gen, dtype=torch.float64).float()
    got = usa.smooth(prob).detach().numpy()
    for c, s in enumerate((sigma, 2 * sigma)):
        # scipy: radius = int(truncate * s + 0.5) = 3, zero padding, kernel normalised over its support
        want = np.stack(
            [gaussian_filter(p, s, mode="constant", cval=0.0, truncate=3 / s) for p in prob[:, c].numpy()]
        )
        np.testing.assert_allclose(got[:, c], want, rtol=0, atol=1e-6)
    assert torch.allclose(usa.kernel().sum(dim=(-2, -1)), torch.ones(2, 1))


def test_gaussian_kernel_is_built_from_sigma_and_trains_it() -> None:
    sigma = torch.tensor([0.8, 2.5], requires_grad=True)
    g = gaussian_kernel1d(sigma, radius=4)
    x = torch.arange(-4, 5, dtype=torch.float32)
    hand = torch.exp(-(x**2)[None] / (2 * sigma.detach()[:, None] ** 2))
    torch.testing.assert_close(g.detach(), hand / hand.sum(-1, keepdim=True))
    (g[:, 4]).sum().backward()  # the centre tap falls as sigma grows
    assert torch.all(sigma.grad < 0)


def test_uncertain_spatial_attention_formula() -> None:
    usa = UncertainSpatialAttention(3, kernel_size=5, sigma=1.3)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        usa.proj.weight.copy_(torch.randn(1, 3, 1, 1, generator=gen))
        usa.proj.bias.fill_(-0.3)
    logits = torch.randn(2, 3, 12, 10, generator=gen) * 3
    prob = torch.sigmoid(logits)
    smoothed = torch.from_numpy(
        np.stack(
            [
                [gaussian_filter(p, 1.3, mode="constant", truncate=2 / 1.3) for p in img]
                for img in prob.numpy()
            ]
        )
    ).float()
    f_anc = torch.maximum(smoothed, prob)
    torch.testing.assert_close(usa.anchor_feature(logits), f_anc, rtol=0, atol=1e-6)
    assert torch.all(f_anc >= prob)  # Max(smoothed, raw) only raises the map (a soft dilation)
    gate = torch.sigmoid((f_anc * usa.proj.weight.view(1, 3, 1, 1)).sum(1, keepdim=True) - 0.3)
    torch.testing.assert_close(usa(logits), gate, rtol=0, atol=1e-6)
    feature = torch.randn(2, 5, 12, 10, generator=gen)
    torch.testing.assert_close(usa.inject(feature, gate), gate * feature + feature)


# ---------------------------------------------------------------------------- SS-Former: NBP-Filter, FFT path
def test_nbp_filter_shapes_range_symmetry_and_timestep() -> None:
    torch.manual_seed(0)
    nbp = NeuralBandPassFilter(emb_channels=6, num_filters=4, hidden=8, num_blocks=2)
    emb = torch.randn(3, 6)
    for h, w in [(8, 6), (5, 7)]:
        half = nbp(emb, h, w)
        assert half.shape == (3, 4, h, w // 2 + 1)
        assert torch.all((half > 0) & (half < 1))
        full = nbp(emb, h, w, onesided=False)
        assert full.shape == (3, 4, h, w)
        torch.testing.assert_close(full[..., : w // 2 + 1], half)
        mirrored = torch.roll(torch.flip(full, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))  # A(-f)
        torch.testing.assert_close(full, mirrored)  # even: filtering keeps real signals real
    assert (nbp(emb[:1], 8, 6) - nbp(emb[1:2], 8, 6)).abs().max() > 1e-4  # adapts to the timestep


def explicit_frequency_logits(q, k, a_q_full, a_k_full, size):
    """S = F^{-1}[A . F[q] F[k]^T] with A = a_q(w_q) a_k(w_k): the N x N map, the paper's formula."""
    b, h, n, d = q.shape
    hh, ww = size
    q_hat = torch.fft.fft2(q.double().transpose(-1, -2).reshape(b, h, d, hh, ww)).reshape(b, h, d, n)
    k_hat = torch.fft.fft2(k.double().transpose(-1, -2).reshape(b, h, d, hh, ww)).reshape(b, h, d, n)
    m = torch.einsum("bhdn,bhdm->bhnm", q_hat, k_hat)  # F[q] F[k]^T, complex (B, heads, N, N)
    a = a_q_full.double().reshape(b, h, n, 1) * a_k_full.double().reshape(b, h, 1, n)
    s = torch.fft.ifftn((a * m).reshape(b, h, hh, ww, hh, ww), dim=(2, 3, 4, 5)).reshape(b, h, n, n)
    # Even filters make the map real: A(-w) = A(w) exactly in real arithmetic. The float32 filter network may
    # round a frequency and its mirror differently (same input, another GEMM row: 1 ulp seen, depending on the
    # thread count), so A's mirror pairs agree to a few float32 ulps (allow 4 per factor: |dA| <= 8 eps32 A)
    # and |Im S| <= mean |dA| |M| <= 8 eps32 mean |A M|; the float64 FFTs add ~1e-16 relative. A filter that
    # is not even leaves an imaginary part of the order of mean |A M| itself.
    eps32 = torch.finfo(torch.float32).eps
    assert s.imag.abs().max() <= 8 * eps32 * (a * m).abs().mean()
    return s.real


@pytest.mark.parametrize("size", [(4, 6), (5, 3)])
def test_frequency_attention_equals_the_explicit_formula(size) -> None:
    torch.manual_seed(1)
    attn = SpectrumSpaceAttention(channels=8, heads=2, emb_channels=6, nbp_hidden=8, nbp_blocks=2)
    n = size[0] * size[1]
    query, context, emb = torch.randn(2, n, 8), torch.randn(2, n, 8), torch.randn(2, 6)
    with torch.no_grad():
        q, k, v = attn.project(query, context)
        a_q, a_k = attn.filters(emb, size)
        full = attn.nbp(emb, *size, onesided=False)
        logits = explicit_frequency_logits(q, k, full[:, :2], full[:, 2:], size)
        q_f, k_f = band_pass_tokens(q, a_q, size), band_pass_tokens(k, a_k, size)
        torch.testing.assert_close((q_f @ k_f.transpose(-1, -2)).double(), logits, rtol=1e-4, atol=1e-4)
        want = torch.softmax(logits / np.sqrt(4), dim=-1).float() @ v
        _, frequency = attn.branches(query, context, emb, size)
        torch.testing.assert_close(frequency, want.transpose(1, 2).reshape(2, n, 8), rtol=1e-4, atol=1e-5)


def test_all_pass_filter_makes_the_frequency_branch_the_spatial_one() -> None:
    torch.manual_seed(2)
    attn = SpectrumSpaceAttention(channels=8, heads=2, emb_channels=6, nbp_hidden=8, nbp_blocks=1)
    with torch.no_grad():  # NBP output sigmoid(30) == 1.0 in float32: A = 1 everywhere
        attn.nbp.head.weight.zero_()
        attn.nbp.head.bias.fill_(30.0)
    size = (4, 6)
    query, context, emb = torch.randn(3, 24, 8), torch.randn(3, 24, 8), torch.randn(3, 6)
    assert torch.all(attn.filters(emb, size)[0] == 1)
    with torch.no_grad():
        spatial, frequency = attn.branches(query, context, emb, size)
        q, k, v = attn.project(query, context)
        plain = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v  # head dim 4
    torch.testing.assert_close(frequency, spatial, rtol=0, atol=1e-5)
    torch.testing.assert_close(spatial, plain.transpose(1, 2).reshape(3, 24, 8), rtol=1e-5, atol=1e-6)


def test_band_pass_tokens_dc_only_gives_the_token_mean() -> None:
    x = torch.randn(2, 3, 20, 5)
    filt = torch.zeros(2, 3, 4, 3)
    filt[..., 0, 0] = 1.0  # pass only the zero frequency
    out = band_pass_tokens(x, filt, (4, 5))
    torch.testing.assert_close(out, x.mean(dim=2, keepdim=True).expand_as(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(band_pass_tokens(x, torch.ones(2, 3, 4, 3), (4, 5)), x, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- default config and runs
def test_default_config_runs_and_reports_size() -> None:
    net = MedSegDiffV2UNet()
    n_params = sum(p.numel() for p in net.parameters())
    print(f"MedSegDiffV2UNet default config: {n_params:,} parameters")
    assert net.downsample_factor == 8
    x_t, t, image = inputs(1, 1, 1, 32, 32)
    with torch.no_grad():
        assert net(x_t, t, net.encode_condition(image)).shape == (1, 1, 32, 32)


SMALL = [
    "model.denoiser.base_channels=8",
    "model.denoiser.cond_channels=4",
    "model.denoiser.channel_mults=[1,2]",
    "model.denoiser.attention_levels=[false,false]",
    "model.denoiser.num_heads=2",
    "model.denoiser.ssformer_blocks=1",
    "model.denoiser.ssformer_heads=2",
    "model.denoiser.nbp_hidden=8",
    "model.denoiser.nbp_blocks=1",
]
RUN = [
    "debug=fast_dev_run",
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "logger=csv",
    "~callbacks.progress_bar",
]


@pytest.mark.parametrize("noise", ["gaussian", "bernoulli"])
def test_fast_dev_run_with_both_kernels(noise: str, tmp_path: Path) -> None:
    from diffseg_lightning.train import train

    overrides = [
        "model=medsegdiff_v2",
        f"noise={noise}",
        "data.size=16",
        "data.num_train=4",
        "data.num_val=2",
    ]
    train(compose_config("train", [*overrides, "data.num_test=2", *RUN, *SMALL], tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_cases"] == 2 and 0.0 <= summary["mean"]["iou"] <= 1.0


def test_refuge_experiment_composes_and_runs_on_a_replica(tmp_path: Path) -> None:
    from hydra.utils import instantiate
    from test_data_refuge import write_refuge

    from diffseg_lightning.train import train

    path = Path(CONFIG_DIR) / "experiment" / "medsegdiff_v2_refuge.yaml"
    assert "noise" not in yaml.safe_load(path.read_text())  # must also run with noise=bernoulli
    root = write_refuge(tmp_path / "REFUGE")
    cfg = compose_config(
        "train", ["experiment=medsegdiff_v2_refuge", f"data.root={root}"], tmp_path / "paper"
    )
    assert (cfg.data.size, cfg.data.target, cfg.data.channels) == (256, "cup", 3)
    with torch.device("meta"):  # the paper-size network, without allocating it
        net = instantiate(cfg.model.denoiser)
    assert net.image_channels == 3 and net.downsample_factor == 32 and len(net.ssformer.blocks) == 4
    print(f"medsegdiff_v2_refuge denoiser: {sum(p.numel() for p in net.parameters()):,} parameters")
    # The experiment's data and method settings, on the replica at a small size and width.
    small = ["data.size=32", *SMALL]
    train(
        compose_config(
            "train", ["experiment=medsegdiff_v2_refuge", f"data.root={root}", *small, *RUN], tmp_path
        )
    )
    assert json.loads((tmp_path / "summary.json").read_text())["num_cases"] >= 1


def test_anchor_loss_is_the_aux_seg_loss_on_the_anchor_logits():
    """The paper's anchor loss is model.aux_seg (Dice + BCE, every alpha-th step): see tests/test_aux_seg.py."""
    from monai.losses import DiceLoss

    from diffseg_lightning.methods.mask_diffusion import aux_seg_loss

    torch.manual_seed(0)
    net = MedSegDiffV2UNet(
        base_channels=8, channel_mults=(1, 2), attention_levels=(False, True), num_heads=2, ssformer_blocks=1,
        ssformer_heads=2, nbp_hidden=8,
    )  # fmt: skip
    cond = net.encode_condition(torch.randn(2, 1, 16, 16))
    target = (torch.rand(2, 1, 16, 16) > 0.5).float()
    logits = net.aux_logits(cond, (16, 16))
    assert logits is cond["anchor_logits"]
    loss = aux_seg_loss(logits, target, "dice_bce")
    expected = DiceLoss(sigmoid=True)(logits, target) + torch.nn.functional.binary_cross_entropy_with_logits(
        logits, target
    )
    assert torch.allclose(loss, expected)
    loss.backward()  # the condition model is supervised directly
    stem = [p.grad for p in net.cond_stem.parameters()]
    assert all(g is not None for g in stem) and sum(g.abs().sum() for g in stem) > 0


def test_the_old_anchor_options_are_accepted_and_ignored():
    with pytest.warns(DeprecationWarning, match="model.aux_seg"):
        MedSegDiffV2UNet(
            base_channels=8, channel_mults=(1, 2), attention_levels=(False, True), num_heads=2,
            ssformer_blocks=1, ssformer_heads=2, nbp_hidden=8, anchor_loss_every=3, anchor_bce_weight=2.0,
        )  # fmt: skip
