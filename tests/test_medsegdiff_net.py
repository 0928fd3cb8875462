"""Tests of the MedSegDiff denoiser and its blocks (diffseg_lightning.nets)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffseg_lightning.nets import DynamicConditionalEncoding, FFParser, MedSegDiffUNet

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(base_channels=8, channel_mults=(1, 2, 4), attention_levels=(False, False, True), num_heads=4)


def tiny_net(**kwargs) -> MedSegDiffUNet:
    torch.manual_seed(0)
    return MedSegDiffUNet(**{**TINY, **kwargs})


def perturb_output_conv(net: MedSegDiffUNet, std: float = 0.1) -> None:
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
@pytest.mark.parametrize("size", [(64, 64), (32, 48), (96, 64)])
@pytest.mark.parametrize("image_channels", [1, 3, 4])
def test_output_shape(size: tuple[int, int], image_channels: int) -> None:
    net = tiny_net(image_channels=image_channels, dynamic_encoding=image_channels != 3)
    x_t, t, image = inputs(2, image_channels, 1, *size)
    out = net(x_t, t, net.encode_condition(image))
    assert out.shape == (2, 1, *size)
    assert net.downsample_factor == 4


@pytest.mark.parametrize("dynamic", [True, False])
def test_output_shape_learned_variance_and_multichannel_mask(dynamic: bool) -> None:
    net = tiny_net(image_channels=4, mask_channels=3, out_channels=6, dynamic_encoding=dynamic)
    assert (net.image_channels, net.mask_channels, net.out_channels) == (4, 3, 6)
    x_t, t, image = inputs(2, 4, 3, 32, 48)
    assert net(x_t, t, net.encode_condition(image)).shape == (2, 6, 32, 48)
    net2 = tiny_net(out_channels=2)
    x_t, t, image = inputs(2, 1, 1, 32, 32)
    assert net2(x_t, t.float(), net2.encode_condition(image)).shape == (2, 2, 32, 32)
    assert net2(x_t, 7, net2.encode_condition(image)).shape == (2, 2, 32, 32)  # scalar t broadcast


def test_bad_size_raises() -> None:
    net = tiny_net()
    x_t, t, image = inputs(2, 1, 1, 30, 64)
    with pytest.raises(ValueError, match=r"\(30, 64\).*factor 4"):
        net.encode_condition(image)
    _, _, good_image = inputs(2, 1, 1, 32, 64)
    with pytest.raises(ValueError, match=r"\(30, 64\).*factor 4"):
        net(x_t, t, net.encode_condition(good_image))
    deeper = tiny_net(channel_mults=(1, 1, 2, 2), attention_levels=(False,) * 4, ff_parser_size=64)
    assert deeper.downsample_factor == 8
    with pytest.raises(ValueError, match="factor 8"):
        deeper.encode_condition(torch.zeros(1, 1, 36, 64))


def test_wrong_image_channels_raises() -> None:
    net = tiny_net(image_channels=3)
    with pytest.raises(ValueError, match="expected 3 image channels, got 1"):
        net.encode_condition(torch.zeros(1, 1, 32, 32))


@pytest.mark.parametrize("dynamic", [True, False])
def test_bad_cond_and_t_raise(dynamic: bool) -> None:
    net = tiny_net(dynamic_encoding=dynamic)
    x_t, t, image = inputs(2, 1, 1, 32, 32)
    with pytest.raises(ValueError, match="encode_condition"):
        net(x_t, t, image)  # the raw image is not the cached condition
    cond = net.encode_condition(image[:1])
    with pytest.raises(ValueError, match="encode_condition"):
        net(x_t, t, cond)  # batch mismatch
    with pytest.raises(ValueError, match="timesteps"):
        net(x_t, t[:1], net.encode_condition(image))
    with pytest.raises(ValueError, match="mask channels"):
        net(torch.zeros(2, 2, 32, 32), t, net.encode_condition(image))


def test_hyperparameter_validation_and_hydra_lists() -> None:
    from omegaconf import OmegaConf

    with pytest.raises(ValueError, match="one flag per level"):
        MedSegDiffUNet(channel_mults=(1, 2), attention_levels=(False, False, True))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MedSegDiffUNet(base_channels=6, channel_mults=(1,), attention_levels=(True,), num_heads=4)
    cfg = OmegaConf.create({"mults": [1, 2], "attn": [False, True], "ff": [32, 48]})
    net = MedSegDiffUNet(
        base_channels=8, channel_mults=cfg.mults, attention_levels=cfg.attn, ff_parser_size=cfg.ff
    )
    assert net.channel_mults == (1, 2) and net.downsample_factor == 2
    x_t, t, image = inputs(1, 1, 1, 32, 48)
    assert net(x_t, t, net.encode_condition(image)).shape == (1, 1, 32, 48)


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("dynamic", [True, False])
def test_every_parameter_gets_a_gradient(dynamic: bool) -> None:
    net = tiny_net(
        dynamic_encoding=dynamic, ff_parser=True, num_res_blocks=2, attention_levels=(False, True, True)
    )
    x_t, t, image = inputs(2, 1, 1, 32, 32)
    target = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))

    def backward() -> None:
        net.zero_grad(set_to_none=True)
        loss = F.mse_loss(net(x_t, t, net.encode_condition(image)), target)
        loss.backward()

    backward()  # zero-initialised output conv: only it gets a gradient here
    assert net.out[-1].conv.weight.grad.abs().sum() > 0
    with (
        torch.no_grad()
    ):  # one plain SGD step (lr 0.1); torch.optim's first step imports torch._dynamo (slow)
        for p in net.parameters():
            p -= 0.1 * p.grad
    backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"parameters without gradient: {missing}"


# ---------------------------------------------------------------------------- split equivalence
@pytest.mark.parametrize("dynamic", [True, False])
def test_split_equals_unsplit_and_repeat_is_exact(dynamic: bool) -> None:
    net = tiny_net(dynamic_encoding=dynamic).eval()
    perturb_output_conv(net)
    x_t, t, image = inputs(2, 1, 1, 32, 48)
    with torch.no_grad():
        cond = net.encode_condition(image)
        assert isinstance(cond, tuple) and len(cond) == (1 if dynamic else 3)
        split = net(x_t, t, cond)
        unsplit = net.forward_with_image(x_t, t, image)
        torch.testing.assert_close(split, unsplit, rtol=0, atol=1e-6)
        assert split.abs().max() > 0

        s = 3  # S samples per image, batched
        cond_rep = tuple(c.repeat_interleave(s, dim=0) for c in cond)
        image_rep = image.repeat_interleave(s, dim=0)
        for a, b in zip(cond_rep, net.encode_condition(image_rep), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        x_rep = torch.randn(2 * s, 1, 32, 48, generator=torch.Generator().manual_seed(9))
        t_rep = t.repeat_interleave(s)
        torch.testing.assert_close(
            net(x_rep, t_rep, cond_rep), net.forward_with_image(x_rep, t_rep, image_rep), rtol=1e-5, atol=1e-6
        )


# ---------------------------------------------------------------------------- FF-Parser
def test_ff_parser_identity_at_init() -> None:
    ff = FFParser(5, (16, 12))
    x = torch.randn(3, 5, 16, 12)
    torch.testing.assert_close(ff(x), x, rtol=0, atol=1e-5)
    x_odd = torch.randn(2, 5, 9, 15)  # other (odd) size: resampled identity map is the identity
    torch.testing.assert_close(ff(x_odd), x_odd, rtol=0, atol=1e-5)


def test_ff_parser_dc_only_map_gives_spatial_mean() -> None:
    ff = FFParser(4, 16)
    with torch.no_grad():
        ff.weight.zero_()
        ff.weight[:, 0, 0, 0] = 1.0
    x = torch.randn(2, 4, 16, 16)
    expected = x.mean(dim=(-2, -1), keepdim=True).expand_as(x)
    torch.testing.assert_close(ff(x), expected, rtol=0, atol=1e-5)


def test_ff_parser_resize_is_frequency_consistent() -> None:
    h_ref, w_ref = 16, 12
    ff = FFParser(2, (h_ref, w_ref))

    def linear_map(h: int, w: int) -> torch.Tensor:
        fr = torch.fft.fftfreq(h)[:, None]  # (h, 1), wrapped order
        fc = torch.fft.rfftfreq(w)[None, :]  # (1, w//2+1)
        real = 0.5 + 1.5 * fr - 2.0 * fc
        imag = -0.25 + 0.75 * fr + 1.0 * fc
        return torch.stack([real, imag], dim=-1)  # (h, w//2+1, 2)

    with torch.no_grad():
        ff.weight.copy_(linear_map(h_ref, w_ref).expand_as(ff.weight))
    # At the reference size the map is the parameter itself.
    torch.testing.assert_close(torch.view_as_real(ff.attentive_map(h_ref, w_ref)), ff.weight.detach())
    for h, w in [(32, 24), (8, 20), (12, 7)]:
        got = torch.view_as_real(ff.attentive_map(h, w)).detach()
        assert got.shape == (2, h, w // 2 + 1, 2)
        want = linear_map(h, w)
        # Rows beyond the reference frequency range take the border value; compare inside it.
        fr = torch.fft.fftfreq(h)
        inside = (fr >= -0.5) & (fr <= torch.fft.fftfreq(h_ref).max() + 1e-6)
        torch.testing.assert_close(got[:, inside], want[inside].expand_as(got[:, inside]), rtol=0, atol=1e-5)
        torch.testing.assert_close(got[:, 0, 0], ff.weight[:, 0, 0].detach())  # DC onto DC
        x = torch.randn(1, 2, h, w)
        assert ff(x).shape == x.shape
    # Gradient flows to the parameter through the resampling.
    ff(torch.randn(1, 2, 32, 24)).square().sum().backward()
    assert torch.any(ff.weight.grad != 0)


# ---------------------------------------------------------------------------- dynamic conditional encoding
def test_dynamic_conditional_encoding_formula() -> None:
    gen = torch.Generator().manual_seed(3)
    m_i = torch.randn(2, 3, 5, 7, generator=gen) * 2 + 1
    m_x = torch.randn(2, 3, 5, 7, generator=gen) - 0.5
    dce = DynamicConditionalEncoding(3)
    ln_i = F.layer_norm(m_i, (3, 5, 7))
    ln_x = F.layer_norm(m_x, (3, 5, 7))
    attention = ln_i * ln_x * m_i
    torch.testing.assert_close(dce.attention(m_i, m_x), attention, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dce(m_i, m_x), m_i + attention, rtol=1e-5, atol=1e-6)
    # Size-agnostic: works unchanged on another spatial size.
    assert dce(torch.randn(1, 3, 9, 4), torch.randn(1, 3, 9, 4)).shape == (1, 3, 9, 4)


# ---------------------------------------------------------------------------- dependence on t and x_t
def test_timestep_changes_output() -> None:
    net = tiny_net().eval()
    perturb_output_conv(net)
    x_t, _, image = inputs(2, 1, 1, 32, 32)
    cond = net.encode_condition(image)
    with torch.no_grad():
        a = net(x_t, torch.tensor([10, 10]), cond)
        b = net(x_t, torch.tensor([900, 900]), cond)
    assert (a - b).abs().max() > 1e-4


def test_condition_stream_depends_on_x_t_only_when_dynamic() -> None:
    x1, t, image = inputs(2, 1, 1, 32, 32, seed=1)
    x2 = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    for dynamic in (True, False):
        net = tiny_net(dynamic_encoding=dynamic).eval()
        with torch.no_grad():
            cond = net.encode_condition(image)
            f1 = net.encoder_features(x1, t, cond)["condition"]
            f2 = net.encoder_features(x2, t, cond)["condition"]
        torch.testing.assert_close(f1[0], f2[0])  # level 0 sees only the image in both modes
        if dynamic:
            assert len(cond) == 1
            assert all((a - b).abs().max() > 1e-4 for a, b in zip(f1[1:], f2[1:], strict=True))
        else:
            # The cached features are the condition stream, whatever x_t is.
            for a, b, c in zip(f1, f2, cond, strict=True):
                torch.testing.assert_close(a, c, rtol=0, atol=0)
                torch.testing.assert_close(b, c, rtol=0, atol=0)


# ---------------------------------------------------------------------------- default config, layering
def test_default_config_runs_and_reports_size() -> None:
    net = MedSegDiffUNet()
    n_params = sum(p.numel() for p in net.parameters())
    print(f"MedSegDiffUNet default config: {n_params:,} parameters")
    x_t, t, image = inputs(1, 1, 1, 64, 64)
    with torch.no_grad():
        assert net(x_t, t, net.encode_condition(image)).shape == (1, 1, 64, 64)
    # nn.Module only, nothing registered outside parameters/buffers
    assert isinstance(net, nn.Module)


def test_nets_import_no_lightning_hydra_or_diffusion() -> None:
    nets_dir = Path(__file__).resolve().parents[1] / "diffseg_lightning" / "nets"
    forbidden = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "diffseg_lightning.diffusion")
    for path in nets_dir.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(forbidden), f"{path.name} imports {name}"
