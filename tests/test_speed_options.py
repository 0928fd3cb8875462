"""Speed options on every method: model.compile, model.channels_last, bf16-mixed sampling, inference_mode."""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
from conftest import TINY, compose_config
from omegaconf import OmegaConf

from diffseg_lightning.entry import build_module
from diffseg_lightning.methods import MaskDiffusionModule
from diffseg_lightning.train import train

UNET = ["model=unet", "model.net.channels=[4,8]", "model.net.strides=[2]", "model.net.num_res_units=1"]
SHORT = ["+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1"]
NO_CHECKPOINTS = ["~callbacks.model_checkpoint", "test=false"]


def tiny(overrides: list[str]) -> list[str]:
    """TINY for either method: the U-Net baseline has no ``model.denoiser``."""
    unet = "model=unet" in overrides
    return [*(o for o in TINY if not (unet and o.startswith("model.denoiser"))), *overrides]


def tiny_module(tmp_path, overrides: list[str]):
    cfg = compose_config("train", tiny(overrides), tmp_path)
    return build_module(cfg.model, cfg.noise, cfg.sampler)


def test_every_model_config_has_the_speed_keys(tmp_path):
    for model in ["medsegdiff", "medsegdiff_v2", "berdiff", "mbdiff", "dtunet", "unet"]:
        cfg = compose_config("train", [f"model={model}"], tmp_path)
        assert cfg.model.compile is False and cfg.model.channels_last is False, model


@pytest.mark.parametrize("overrides", [[], UNET], ids=["medsegdiff", "unet"])
def test_compile_keeps_the_checkpoint_keys(tmp_path, monkeypatch, overrides):
    """A compiled run's checkpoint has the state_dict keys of an eager one (no ``_orig_mod.``).

    The ``eager`` backend keeps the test fast: TorchDynamo still traces the network, the graph is not lowered.
    """
    calls = []
    real = torch.compile

    def eager_compile(fn, **kwargs):
        calls.append(fn)
        return real(fn, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", eager_compile)
    eager_keys = list(tiny_module(tmp_path, overrides).state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(
            compose_config("train", tiny([*overrides, *SHORT, "model.compile=true", "test=false"]), tmp_path)
        )
    assert not [w for w in caught if "model.compile" in str(w.message)]  # no fallback: it compiled
    assert len(calls) == 1  # once, in setup
    checkpoint = torch.load(sorted((tmp_path / "checkpoints").glob("*.ckpt"))[-1], weights_only=False)
    assert list(checkpoint["state_dict"]) == eager_keys
    assert not any("_orig_mod" in k for k in checkpoint["state_dict"])


def test_compile_falls_back_to_eager_with_one_warning(tmp_path, monkeypatch):
    def failing_compile(*args, **kwargs):
        raise RuntimeError("inductor is unavailable: no working C++ compiler")

    monkeypatch.setattr(torch, "compile", failing_compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = train(
            compose_config("train", tiny([*SHORT, "model.compile=true", *NO_CHECKPOINTS]), tmp_path)
        )
    ours = [w for w in caught if "model.compile=true" in str(w.message)]
    assert len(ours) == 1
    assert "no working C++ compiler" in str(ours[0].message) and "eagerly" in str(ours[0].message)
    assert torch.isfinite(torch.tensor(metrics["val/dice"]))


def test_compile_failing_at_the_first_call_falls_back(tmp_path, monkeypatch):
    """torch.compile is lazy: a backend that fails when the graph is first compiled also falls back."""

    def broken_backend(gm, example_inputs):
        raise RuntimeError("backend exploded")

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **{**kw, "backend": broken_backend}))
    module = tiny_module(tmp_path, ["model.compile=true"]).eval()
    x_t, t, image = torch.randn(2, 1, 32, 32), torch.tensor([0, 1]), torch.randn(2, 1, 32, 32)
    expected = module(x_t, t, image)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.apply_speed_options()
        first = module(x_t, t, image)
        second = module(x_t, t, image)
    assert sum("backend exploded" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)


@pytest.mark.parametrize("overrides", [[], UNET], ids=["medsegdiff", "unet"])
def test_channels_last_gives_the_same_outputs(tmp_path, overrides):
    torch.manual_seed(0)
    plain = tiny_module(tmp_path, overrides).eval()
    fast = tiny_module(tmp_path, [*overrides, "model.channels_last=true"]).eval()
    fast.load_state_dict(plain.state_dict())
    fast.apply_speed_options()
    conv = next(p for p in fast.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    image = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        if isinstance(plain, MaskDiffusionModule):
            x_t, t = torch.randn(2, 1, 32, 32), torch.tensor([0, 1])
            torch.testing.assert_close(fast(x_t, t, image), plain(x_t, t, image), atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(fast(image), plain(image), atol=1e-5, rtol=1e-5)
        a, b = plain.sample(image, torch.tensor([0, 1])), fast.sample(image, torch.tensor([0, 1]))
    torch.testing.assert_close(b["probability"], a["probability"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [[], UNET], ids=["medsegdiff", "unet"])
def test_bf16_mixed_trains_and_samples_under_autocast_in_inference_mode(tmp_path, monkeypatch, overrides):
    """On CPU: one bf16-mixed training step, then sampling under the same autocast and inference_mode."""
    seen = []
    module_cls = type(tiny_module(tmp_path, overrides))
    real_sample = module_cls.sample

    @functools.wraps(real_sample)
    def spy(self, image, case_ids=None):
        out = real_sample(self, image, case_ids)
        seen.append(
            {
                "autocast": torch.is_autocast_enabled("cpu"),
                "dtype": torch.get_autocast_dtype("cpu"),
                "inference": torch.is_inference_mode_enabled() and out["probability"].is_inference(),
            }
        )
        return out

    monkeypatch.setattr(module_cls, "sample", spy)
    cfg = compose_config(
        "train", tiny([*overrides, "debug=fast_dev_run", "trainer.precision=bf16-mixed"]), tmp_path
    )
    assert OmegaConf.select(cfg, "trainer.precision") == "bf16-mixed"
    train(cfg)
    assert seen and all(s["autocast"] and s["dtype"] == torch.bfloat16 and s["inference"] for s in seen)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(torch.isfinite(torch.tensor(summary["mean"][k])) for k in ("dice", "iou"))


def test_gpu_trainer_uses_bf16_mixed(tmp_path):
    cfg = compose_config("train", ["trainer=gpu"], tmp_path)
    assert cfg.trainer.precision == "bf16-mixed"
