"""The solvers (``diffusion/solvers``), one test per file pinning its published update against a hand
computation in float64; their determinism and settings; the ``sampler=`` config group; a solver that does not
fit the kernel is refused when the config is checked.

Tolerances: the hand computations use float64 schedules built from the definitions; the kernels store their
tables in float32 (``.double()`` casts them back), so ``abar`` carries a relative error of ~6e-8 and the
coefficients of a step ~1e-7: ``rtol = 1e-6`` leaves a margin of 10 and is far below any change of formula.
"""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from diffseg_lightning import evaluate
from diffseg_lightning import train as train_cli
from diffseg_lightning.diffusion import (
    DDIM,
    DDPM,
    BernoulliKernel,
    BernoulliPosterior,
    DPMSolverPP2M,
    GaussianKernel,
)
from diffseg_lightning.exceptions import ConfigError
from diffseg_lightning.inference import DiffusionSampler
from diffseg_lightning.utils.compose import compose_config
from diffseg_lightning.validate import validate_config

RTOL = 1e-6
T = 1000


def abar64(t: int) -> float:
    """abar_t of the linear schedule (1e-4 .. 0.02, T = 1000) in float64, from its definition; 1 at t = -1."""
    if t < 0:
        return 1.0
    return float(torch.prod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64)[: t + 1]))


def tiny(seed: int, shape: tuple[int, ...] = (2, 1, 2, 2)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=1e-9)


# ------------------------------------------------------------------------------------ one test per solver
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_is_song_et_al_eq_12_and_16(eta):
    """x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z, with
    sigma^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev); epsilon objective, no clipping."""
    k = GaussianKernel().double()
    t, t_prev = 600, 250
    x_t, eps = tiny(0), tiny(1)
    x_prev, x0_pred = DDIM(eta=eta, clip_x0=False).step(
        k, eps, t, t_prev, x_t, generator=torch.Generator().manual_seed(2)
    )
    a, ap = abar64(t), abar64(t_prev)
    x0 = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
    sigma2 = eta**2 * (1 - ap) / (1 - a) * (1 - a / ap)
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma2) * eps + (math.sqrt(sigma2) * z if eta > 0 else 0.0)
    close(x0_pred, x0)
    close(x_prev, want)


def test_ddim_clips_x0_and_rederives_eps():
    """clip_x0: x0 clamped to [-1, 1], eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar) (guided-diffusion)."""
    k = GaussianKernel(objective="x0").double()
    t, t_prev = 300, 100
    x_t, out = tiny(3), 3 * tiny(4)
    x_prev, x0_pred = DDIM(eta=0.0, clip_x0=True).step(k, out, t, t_prev, x_t)
    a, ap = abar64(t), abar64(t_prev)
    x0 = out.clamp(-1, 1)
    eps = (x_t - math.sqrt(a) * x0) / math.sqrt(1 - a)
    close(x0_pred, x0)
    close(x_prev, math.sqrt(ap) * x0 + math.sqrt(1 - ap) * eps)


@pytest.mark.parametrize("v", [None, -0.5, 0.7])
def test_ddpm_is_the_respaced_posterior_with_nichol_dhariwal_eq_15(v):
    """mean = sqrt(abar_prev) beta / (1 - abar_t) x0 + sqrt(abar_t / abar_prev) (1 - abar_prev) / (1 - abar_t) x_t,
    beta = 1 - abar_t / abar_prev; var = beta (1 - abar_prev) / (1 - abar_t), or with a learned v,
    log var = v' log beta + (1 - v') log var, v' = (v + 1) / 2."""
    k = GaussianKernel(objective="x0", learn_variance=v is not None).double()
    t, t_prev = 700, 400
    x_t, x0 = tiny(5), tiny(6).clamp(-1, 1)
    out = x0 if v is None else torch.cat([x0, torch.full_like(x0, v)], 1)
    x_prev, x0_pred = DDPM(clip_x0=False).step(
        k, out, t, t_prev, x_t, generator=torch.Generator().manual_seed(7)
    )
    a, ap = abar64(t), abar64(t_prev)
    beta = 1 - a / ap
    mean = math.sqrt(ap) * beta / (1 - a) * x0 + math.sqrt(a / ap) * (1 - ap) / (1 - a) * x_t
    var = beta * (1 - ap) / (1 - a)
    if v is not None:
        frac = (v + 1) / 2
        var = math.exp(frac * math.log(beta) + (1 - frac) * math.log(var))
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    close(x0_pred, x0)
    close(x_prev, mean + math.sqrt(var) * z)


def test_ddpm_final_step_returns_x0_pred():
    k = GaussianKernel(objective="x0", learn_variance=True).double()
    x0 = tiny(8).clamp(-1, 1)
    x_prev, x0_pred = DDPM().step(k, torch.cat([x0, torch.zeros_like(x0)], 1), 5, -1, tiny(9))
    assert torch.equal(x_prev, x0_pred) and torch.equal(x0_pred, x0)


def test_dpmpp_2m_is_lu_et_al_algorithm_2():
    """Two steps and the final one: D = x0 first, then D = (1 + 1/(2r)) x0 - 1/(2r) x0_last, r = h_last / h;
    x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (e^{-h} - 1) D, lambda = log(alpha / sigma)."""
    k = GaussianKernel(objective="x0").double()
    solver, state = DPMSolverPP2M(clip_x0=False), {}
    grid = [999, 600, 200, -1]
    preds = [tiny(10).clamp(-1, 1), tiny(11).clamp(-1, 1), tiny(12).clamp(-1, 1)]
    x = tiny(13)

    def lam(t: int) -> float:
        return 0.5 * math.log(abar64(t) / (1 - abar64(t)))

    want, last = x.clone(), None
    for i, (t, t_prev) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        x, x0_pred = solver.step(k, preds[i], t, t_prev, x, state=state)
        if t_prev < 0:
            want = preds[i]  # lambda_prev = +inf: x_prev = x0_pred
        else:
            h = lam(t_prev) - lam(t)
            d = preds[i]
            if last is not None:
                r = (lam(t) - last[1]) / h
                d = (1 + 1 / (2 * r)) * preds[i] - 1 / (2 * r) * last[0]
            ratio = math.sqrt((1 - abar64(t_prev)) / (1 - abar64(t)))
            want = ratio * want - math.sqrt(abar64(t_prev)) * math.expm1(-h) * d
        last = (preds[i], lam(t))
        close(x0_pred, preds[i])
        close(x, want)
    assert set(state) == {"x0_pred", "lambda"}


def test_bernoulli_posterior_is_chen_et_al_eq_5():
    """theta = Norm([alpha [1 - y_t, y_t] + (1 - alpha)/2] * [abar_s [1 - x0, x0] + (1 - abar_s)/2]), second
    channel, alpha = abar_t / abar_s; y_s = [u < theta] with the step's uniform draw u; x0 = y_t + (1 - 2 y_t)
    sigmoid(output) (the calibration of the eps objective)."""
    k = BernoulliKernel().double()
    t, s = 500, 120
    y_t = (tiny(14) > 0).double()
    logits = tiny(15)
    y_s, x0_pred = BernoulliPosterior().step(
        k, logits, t, s, y_t, generator=torch.Generator().manual_seed(16)
    )
    x0 = y_t + (1 - 2 * y_t) * torch.sigmoid(logits)
    alpha, ab = abar64(t) / abar64(s), abar64(s)
    fg = (alpha * y_t + (1 - alpha) / 2) * (ab * x0 + (1 - ab) / 2)
    bg = (alpha * (1 - y_t) + (1 - alpha) / 2) * (ab * (1 - x0) + (1 - ab) / 2)
    u = torch.rand(y_t.shape, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    close(x0_pred, x0)
    assert torch.equal(y_s, (u < fg / (fg + bg)).double())
    final, _ = BernoulliPosterior().step(k, logits, t, -1, y_t)
    close(final, x0)  # the final step returns the probability
    binary, _ = BernoulliPosterior(binarize_final=True).step(
        k, logits, t, -1, y_t, torch.Generator().manual_seed(17)
    )
    u = torch.rand(y_t.shape, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
    assert torch.equal(binary, (u < x0).double())


# ------------------------------------------------------------------------------------ contract
def test_determinism_names_and_settings():
    cases = [
        (DDIM(eta=0.0), True, {"update": "ddim", "eta": 0.0, "clip_x0": True}),
        (DDIM(eta=0.3, clip_x0=False), False, {"update": "ddim", "eta": 0.3, "clip_x0": False}),
        (DDPM(), False, {"update": "ddpm", "clip_x0": True}),
        (DPMSolverPP2M(clip_x0=False), True, {"update": "dpmpp_2m", "clip_x0": False}),
        (
            BernoulliPosterior(),
            False,
            {"update": "posterior", "binarize_final": False},
        ),  # as summary.json said
    ]
    for solver, deterministic, settings in cases:
        assert solver.is_deterministic is deterministic, solver
        assert solver.settings() == {**settings, "deterministic": deterministic}, solver
    for bad in (-0.1, "0", True):
        with pytest.raises(ConfigError, match="eta"):
            DDIM(eta=bad)


def test_deterministic_solvers_draw_nothing():
    k = GaussianKernel()
    x, out = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    for solver in (DDIM(eta=0.0), DPMSolverPP2M()):
        gen = torch.Generator().manual_seed(0)
        solver.step(k, out, 500, 100, x, generator=gen)
        assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state()), solver


def test_the_kernels_default_solvers():
    assert repr(GaussianKernel().default_solver()) == "DDIM(eta=0.0, clip_x0=True)"
    assert repr(BernoulliKernel().default_solver()) == "BernoulliPosterior(binarize_final=False)"
    assert DiffusionSampler().resolve_solver(BernoulliKernel()).name == "posterior"
    settings = DiffusionSampler().settings(GaussianKernel())
    assert (settings["update"], settings["deterministic"]) == ("ddim", True)
    assert settings["solver"] == {"eta": 0.0, "clip_x0": True}
    assert DiffusionSampler().settings().keys() == settings.keys()  # the same keys without a kernel


def test_a_solver_of_another_kernel_is_refused():
    with pytest.raises(ConfigError, match=r"sampler=ddim \(the DDIM solver\) samples a GaussianKernel, but the "
                       r"noise kernel is a BernoulliKernel; .*sampler=bernoulli"):  # fmt: skip
        DiffusionSampler(solver=DDIM()).resolve_solver(BernoulliKernel())
    with pytest.raises(ConfigError, match="sampler=bernoulli .* GaussianKernel; .*sampler=ddim"):
        DiffusionSampler(solver=BernoulliPosterior()).resolve_solver(GaussianKernel())


# ------------------------------------------------------------------------------------ the sampler= group
@pytest.mark.parametrize(
    "group,noise,solver,steps",
    [
        ("default", "gaussian", None, 25),
        ("default", "bernoulli", None, 25),
        ("fast", "gaussian", None, 10),
        ("ddim", "gaussian", "DDIM(eta=0.0, clip_x0=True)", 25),
        ("ddpm", "gaussian", "DDPM(clip_x0=True)", 25),
        ("dpmpp_2m", "gaussian", "DPMSolverPP2M(clip_x0=True)", 25),
        ("bernoulli", "bernoulli", "BernoulliPosterior(binarize_final=False)", 25),
        ("reference", "gaussian", "DDPM(clip_x0=True)", 1000),  # MedSegDiff's released protocol
    ],
)
def test_every_sampler_group_composes(group, noise, solver, steps, tmp_path):
    cfg = compose_config("train", [f"sampler={group}", f"noise={noise}"], tmp_path)
    validate_config(cfg)
    sampler = instantiate(cfg.sampler)
    assert isinstance(sampler, DiffusionSampler) and sampler.num_steps == steps
    assert (None if sampler.solver is None else repr(sampler.solver)) == solver
    kernel = instantiate(cfg.noise)
    assert sampler.settings(kernel)["update"] == sampler.resolve_solver(kernel).name


def test_solver_options_from_the_command_line(tmp_path):
    cfg = compose_config(
        "train", ["sampler=ddim", "sampler.solver.eta=0.5", "sampler.solver.clip_x0=false"], tmp_path
    )
    assert repr(instantiate(cfg.sampler).solver) == "DDIM(eta=0.5, clip_x0=False)"
    cfg = compose_config("eval", ["ckpt_path=x", "sampler=dpmpp_2m", "sampler.num_steps=5"], tmp_path)
    assert repr(instantiate(cfg.sampler).solver) == "DPMSolverPP2M(clip_x0=True)"


MISFIT = {
    "ddim-on-bernoulli": (
        ["noise=bernoulli", "sampler=ddim"],
        "sampler=ddim (the DDIM solver) samples a GaussianKernel, but the noise kernel is a BernoulliKernel; "
        "choose a solver of it, e.g. sampler=bernoulli, or sampler=default (the kernel's default solver)",
    ),
    "bernoulli-on-gaussian": (
        ["sampler=bernoulli"],
        "sampler=bernoulli (the BernoulliPosterior solver) samples a BernoulliKernel, but the noise kernel is a "
        "GaussianKernel; choose a solver of it, e.g. sampler=ddim, or sampler=default (the kernel's default "
        "solver)",
    ),
}


@pytest.mark.parametrize("name", sorted(MISFIT))
def test_a_misfit_is_a_one_line_config_error_at_composition(name, tmp_path):
    overrides, message = MISFIT[name]
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config("train", overrides, tmp_path))
    assert str(err.value) == message


OLD_KEYS = {
    "noise.sampling": (
        "noise.sampling=dpmpp_2m",
        "noise.sampling=dpmpp_2m is no longer a noise setting (solver settings moved out of the noise kernel): "
        "choose the reverse update with sampler=dpmpp_2m (sampler=ddim|ddpm|dpmpp_2m for noise=gaussian, "
        "sampler=bernoulli for noise=bernoulli, sampler=default for the kernel's default)",
    ),
    "noise.eta": (
        "noise.eta=1.0",
        "noise.eta=1.0 is no longer a noise setting (solver settings moved out of the noise kernel): it is "
        "DDIM's, set it with sampler=ddim sampler.solver.eta=1.0",
    ),
    "noise.clip_x0": (
        "noise.clip_x0=false",
        "noise.clip_x0=false is no longer a noise setting (solver settings moved out of the noise kernel): set it "
        "with sampler=ddim|ddpm|dpmpp_2m sampler.solver.clip_x0=false",
    ),
    "noise.binarize_final": (
        "noise.binarize_final=true",
        "noise.binarize_final=true is no longer a noise setting (solver settings moved out of the noise kernel): "
        "set it with sampler=bernoulli sampler.solver.binarize_final=true",
    ),
}


@pytest.mark.parametrize("name", sorted(OLD_KEYS))
@pytest.mark.parametrize("main", [train_cli.main, evaluate.main], ids=["train", "eval"])
def test_an_old_solver_key_on_the_command_line_says_where_it_went(name, main, cli, tmp_path):
    override, message = OLD_KEYS[name]
    extra = ["ckpt_path=x"] if main is evaluate.main else []
    result = cli(main, *extra, override, cwd=tmp_path)
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [f"error: {message}"]
    # the same from validate_config when the key reaches a kernel's node (a config file, +noise.<key>)
    if main is train_cli.main:
        with pytest.raises(ConfigError) as err:
            validate_config(compose_config("train", [f"+{override}"], tmp_path))
        assert str(err.value) == message


def test_a_solver_walks_the_kernels_strided_steps():
    """``solver.timesteps(kernel, N)`` (the design's contract) is the kernel's trailing grid, starting at T - 1."""
    from diffseg_lightning.diffusion import BernoulliKernel, GaussianKernel
    from diffseg_lightning.diffusion.solvers import DDIM, BernoulliPosterior
    from diffseg_lightning.exceptions import ConfigError

    kernel = GaussianKernel(num_train_timesteps=1000)
    for n in (1, 10, 1000):
        steps = DDIM().timesteps(kernel, n)
        assert torch.equal(steps, kernel.inference_timesteps(n)) and int(steps[0]) == 999
    assert torch.equal(
        BernoulliPosterior().timesteps(BernoulliKernel(num_train_timesteps=10), 10), torch.arange(9, -1, -1)
    )
    with pytest.raises(ConfigError, match="BernoulliKernel"):
        DDIM().timesteps(BernoulliKernel(), 10)
