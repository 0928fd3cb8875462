"""The shared diffusion-feature extractor and its disk cache (issue 8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet

from diffseg_lightning.diffusion.gaussian import GaussianKernel
from diffseg_lightning.features import DiffusionFeatureExtractor, FeatureCache, dataset_identity

BLOCKS = ["up_blocks.0", "up_blocks.1"]
TIMESTEPS = [5, 15, 25]


def tiny_unet(num_class_embeds: int | None = None, seed: int = 0) -> DiffusionModelUNet:
    torch.manual_seed(seed)
    net = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=3,
        out_channels=3,
        channels=(8, 16),
        attention_levels=(False, False),
        num_res_blocks=1,
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
    )
    with torch.no_grad():  # MONAI zero-initialises the residual branches' last conv: make t and labels matter
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.1)
    return net


@pytest.fixture(scope="module")
def kernel() -> GaussianKernel:
    return GaussianKernel(num_train_timesteps=50)


def images(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_features_match_separate_passes(one_thread, kernel):
    """Ordering (timestep, then block), bilinear resize and noising against one pass per timestep."""
    net = tiny_unet()
    ex = DiffusionFeatureExtractor(net, BLOCKS, TIMESTEPS, kernel=kernel, output_size=12, noise_seed=3)
    x = images()
    feats = ex(x)
    channels = {"up_blocks.0": 16, "up_blocks.1": 8}
    assert ex.block_channels == channels
    assert ex.out_channels == 24 * 3 and feats.shape == (2, 72, 12, 12)
    noise = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    expected = []
    acts: dict[str, torch.Tensor] = {}
    for k, t in enumerate(TIMESTEPS):
        acts.clear()
        handles = [
            dict(net.named_modules())[b].register_forward_hook(
                lambda m, i, o, b=b, acts=acts: acts.__setitem__(b, o if torch.is_tensor(o) else o[0])
            )
            for b in BLOCKS
        ]
        tt = torch.full((2,), t)
        x_t = kernel.sqrt_alphas_cumprod[t] * x + kernel.sqrt_one_minus_alphas_cumprod[t] * noise[k]
        with torch.no_grad():
            net(x_t, tt)
        for h in handles:
            h.remove()
        for b in BLOCKS:
            expected.append(F.interpolate(acts[b], size=(12, 12), mode="bilinear", align_corners=False))
    expected = torch.cat(expected, 1)
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-5)
    assert ex.feature_names() == [f"t{t}/{b}" for t in TIMESTEPS for b in BLOCKS]


def test_one_backbone_pass_for_all_timesteps_and_hooks_removed(one_thread, kernel):
    net = tiny_unet()
    ex = DiffusionFeatureExtractor(net, BLOCKS, TIMESTEPS, kernel=kernel)
    assert ex.out_channels == (16 + 8) * 3  # measured by a dry run before any forward
    batches = []
    net.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    out = ex(images(b=4))
    assert batches == [12]  # one call, K * B = 3 * 4
    assert out.shape == (4, 72, 16, 16)
    modules = dict(net.named_modules())
    assert all(len(modules[b]._forward_hooks) == 0 for b in BLOCKS)
    assert not out.is_inference()  # usable as an ordinary input


def test_unknown_block_lists_valid_ones(kernel):
    with pytest.raises(ValueError, match=r"unknown block\(s\) \['decoder.9'\].*up_blocks\.1"):
        DiffusionFeatureExtractor(tiny_unet(), ["decoder.9"], [1], kernel=kernel)
    with pytest.raises(ValueError, match="outside"):
        DiffusionFeatureExtractor(tiny_unet(), BLOCKS, [50], kernel=kernel)
    with pytest.raises(ValueError, match="empty"):
        DiffusionFeatureExtractor(tiny_unet(), BLOCKS, [], kernel=kernel)


def test_backbone_frozen_and_gets_no_gradient(one_thread, kernel):
    net = tiny_unet()
    ex = DiffusionFeatureExtractor(net, BLOCKS, [5], kernel=kernel)
    ex.train()
    assert not net.training and all(not p.requires_grad for p in net.parameters())
    probe = torch.nn.Conv2d(ex.out_channels, 1, 1)
    loss = probe(ex(images())).square().mean()
    loss.backward()
    assert probe.weight.grad is not None and probe.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


def test_fixed_noise_and_kwargs_repeated(one_thread, kernel):
    """The same image gives the same features whatever its batch; class labels follow their image."""
    net = tiny_unet(num_class_embeds=3)
    ex = DiffusionFeatureExtractor(net, ["up_blocks.1"], [10, 30], kernel=kernel)
    x = images(b=3)
    labels = torch.tensor([0, 1, 2])
    full = ex(x, class_labels=labels)
    single = ex(x[2:3], class_labels=labels[2:3])
    torch.testing.assert_close(full[2:3], single, rtol=1e-4, atol=1e-5)
    other = ex(x[2:3], class_labels=labels[:1])
    assert not torch.allclose(other, single)  # the label reaches the backbone
    ex2 = DiffusionFeatureExtractor(net, ["up_blocks.1"], [10, 30], kernel=kernel, noise_seed=1)
    assert not torch.allclose(ex2(x[2:3], class_labels=labels[2:3]), single)


def test_no_kernel_uses_input_as_is(one_thread):
    net = tiny_unet()
    ex = DiffusionFeatureExtractor(net, ["conv_in"], [0, 7], kernel=None)
    x = images(b=1)
    out = ex(x)
    with torch.no_grad():
        ref = net.conv_in(x)
    torch.testing.assert_close(out, torch.cat([ref, ref], 1))


def test_cache_hit_equals_recompute(one_thread, kernel, tmp_path):
    net = tiny_unet()
    ex = DiffusionFeatureExtractor(net, BLOCKS, [5, 25], kernel=kernel, output_size=8)
    ident = dataset_identity(range(4), normalize="zscore")
    cache = FeatureCache(tmp_path, ex, ident)
    x = images(b=3)
    ids = ["a", "b/1", "c"]
    first = cache(x[:2], ids[:2])
    assert (cache.hits, cache.misses) == (0, 2)
    mixed = cache(x, ids)  # two hits, one miss
    assert (cache.hits, cache.misses) == (2, 3)
    torch.testing.assert_close(mixed, ex(x), rtol=1e-4, atol=1e-5)  # batch size changes conv rounding
    torch.testing.assert_close(mixed[:2], first, rtol=0, atol=0)
    assert (cache.directory / "setting.json").exists()
    # any change of setting or weights gives another key
    assert (
        FeatureCache(tmp_path, DiffusionFeatureExtractor(net, BLOCKS, [5], kernel=kernel), ident).key
        != cache.key
    )
    assert FeatureCache(tmp_path, ex, ident + "x").key != cache.key
    other = DiffusionFeatureExtractor(tiny_unet(seed=1), BLOCKS, [5, 25], kernel=kernel, output_size=8)
    assert FeatureCache(tmp_path, other, ident).key != cache.key
