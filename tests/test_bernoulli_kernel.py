"""Oracle, closed-form and contract tests of the Bernoulli noise kernel (BerDiff) and its posterior-step solver.

Statistical tolerances: a frequency ``p_hat`` of ``n`` i.i.d. Bernoulli(p) draws has standard
deviation ``sqrt(p (1 - p) / n)``; every statistical check allows ``Z = 5`` such standard
deviations (two-sided probability of a false alarm 5.7e-7 per check), with fixed seeds.
Brute-force references are computed in float64 from the definitions (one-step transition
matrices, sums over outcomes), independently of the kernel's closed forms.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate
from torch.distributions import Bernoulli

from diffseg_lightning.diffusion import BernoulliKernel, BernoulliPosterior
from diffseg_lightning.diffusion.bernoulli import BERNOULLI_OBJECTIVES, bernoulli_kl, bernoulli_posterior
from diffseg_lightning.inference.sampler import DiffusionSampler

pytestmark = pytest.mark.usefixtures("one_thread")

Z = 5.0
T = 1000
SHAPE = (4, 1, 64, 64)  # 16384 pixels, about 8k per class: a class frequency is checked to +-0.028
ORACLE_LOGIT = 20.0


def binary_y0(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) > 0.5).float()


def linear_alphas64(T: int = T) -> torch.Tensor:
    """alpha_t = 1 - beta_t of the DDPM linear schedule in float64, independent of the kernel."""
    return 1 - torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)


def transition(alpha: float) -> torch.Tensor:
    """One-step matrix M[i, j] = q(y_t = j | y_{t-1} = i) of q(y_t | y_{t-1}) = B(alpha y_{t-1} + (1 - alpha)/2)."""
    p1 = torch.tensor([(1 - alpha) / 2, alpha + (1 - alpha) / 2], dtype=torch.float64)  # P(y_t = 1 | i)
    return torch.stack([1 - p1, p1], dim=1)


def chain(alphas: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """q(y_last | y_{first-1}) as the product of the one-step matrices first .. last (identity if empty)."""
    m = torch.eye(2, dtype=torch.float64)
    for i in range(first, last + 1):
        m = m @ transition(float(alphas[i]))
    return m


def brute_posterior(
    alphas: torch.Tensor, t: int, s: int, y0_prob: torch.Tensor, yt: torch.Tensor
) -> torch.Tensor:
    """P(y_s = 1 | y_t, y_0 ~ B(y0_prob)) by Bayes over the enumerated states (s = -1 is y_0 itself).

    ``q(y_t | y_s) q(y_s | y_0)`` with both factors from products of one-step matrices, normalised
    over ``y_s``; elementwise over the float64 vectors ``y0_prob`` and ``yt`` (values in {0, 1}).
    """
    prior = torch.stack([1 - y0_prob, y0_prob], dim=-1)  # (n, 2) over y_0
    q_s = prior @ chain(alphas, 0, s)  # (n, 2): q(y_s)
    lik = chain(alphas, s + 1, t)[:, yt.long()].T  # (n, 2): q(y_t | y_s) over y_s
    joint = q_s * lik
    return joint[:, 1] / joint.sum(-1)


def oracle_logits(k: BernoulliKernel, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    """A perfect network: logits (+-20) of the true noise eps = y_0 XOR y_t, or of y_0 itself."""
    target = y0 if k.objective == "x0" else (x - y0).abs()
    return ORACLE_LOGIT * (2 * target - 1)


def class_zscores(x: torch.Tensor, y0: torch.Tensor, abar: float) -> tuple[float, float]:
    """z-scores of the foreground frequency of x on the y0 = 1 and y0 = 0 pixels against q(y | y0)."""
    n1, n = float(y0.sum()), y0.numel()
    fg1 = float((x * y0).sum())  # exact: integer counts below 2^24
    fg0 = float(x.sum()) - fg1
    zs = []
    for v, fg, count in ((1.0, fg1, n1), (0.0, fg0, n - n1)):
        want = abar * v + (1 - abar) / 2
        zs.append((fg / count - want) / math.sqrt(want * (1 - want) / count))
    return zs[0], zs[1]


@torch.inference_mode()
def run_chain(
    k: BernoulliKernel,
    y0: torch.Tensor,
    num_steps: int,
    gen: torch.Generator,
    solver: BernoulliPosterior | None = None,
):
    """Sample with the oracle and ``solver`` (the posterior step); check every intermediate marginal; return the
    final (x_prev, x0_pred)."""
    solver = solver or BernoulliPosterior()
    abar64 = torch.cumprod(linear_alphas64(k.num_train_timesteps), 0)
    x = k.sample_prior(y0.shape, "cpu", generator=gen)
    ts = k.inference_timesteps(num_steps).tolist()
    assert ts[0] == k.num_train_timesteps - 1
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        tb = torch.full((y0.shape[0],), t, dtype=torch.long)
        x, x0_pred = solver.step(
            k, oracle_logits(k, x, y0), tb, torch.full_like(tb, t_prev), x, generator=gen
        )
        if t_prev >= 0:
            assert float((x * (1 - x)).abs().sum()) == 0.0, "intermediate samples are binary"
            z1, z0 = class_zscores(x, y0, float(abar64[t_prev]))
            assert abs(z1) <= Z and abs(z0) <= Z, f"{num_steps} steps, {t}->{t_prev}: z = {z1:.1f}, {z0:.1f}"
    return x, x0_pred


# ----------------------------------------------------------------------------- forward process
def marginal_deviation(sampler, t: int, n: int = 100_000) -> float:
    """Largest |z| of the foreground frequency of sampler(y0, t) against abar y0 + (1 - abar)/2, y0 in {0, 1}."""
    abar = float(torch.cumprod(linear_alphas64(), 0)[t])
    worst = 0.0
    for v in (0.0, 1.0):
        y = sampler(torch.full((1, 1, n, 1), v), torch.tensor([t]))
        want = abar * v + (1 - abar) / 2
        worst = max(worst, abs(float(y.double().mean()) - want) / math.sqrt(want * (1 - want) / n))
    return worst


def test_q_sample_marginals_match_closed_form():
    k = BernoulliKernel()
    torch.manual_seed(0)
    for t in (0, 1, 10, T // 4, T // 2, T - 1):
        assert marginal_deviation(k.q_sample, t) <= Z, f"t={t}"
    y = k.q_sample(torch.full((1, 1, 100, 1), 1.0), torch.tensor([T - 1]))
    assert y.dtype == torch.float32 and set(y.unique().tolist()) <= {0.0, 1.0}


def test_released_forward_bug_fails_the_marginal_check():
    """The released q_mean drops (1 - abar)/2, so background never flips: the check above must reject it."""
    k = BernoulliKernel()
    torch.manual_seed(0)

    def released(y0, t):
        return torch.bernoulli(k.alphas_cumprod[t].view(-1, 1, 1, 1) * y0)

    for t in (T // 4, T - 1):
        assert marginal_deviation(released, t) > 10 * Z
    # and the closed form is pinned: q(y_t = 1 | y_0 = 0) = (1 - abar_t) / 2, not 0
    abar64 = torch.cumprod(linear_alphas64(), 0)
    t = torch.tensor([0, 1, T // 2, T - 1])
    for v in (0.0, 1.0):
        got = k.q_probs(torch.full((4, 1, 1, 1), v), t).flatten().double()
        want = abar64[t] * v + (1 - abar64[t]) / 2
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_q_sample_is_xor_with_the_given_noise():
    k = BernoulliKernel()
    y0 = binary_y0(0, (2, 1, 8, 8))
    eps = binary_y0(1, (2, 1, 8, 8))
    yt = k.q_sample(y0, torch.tensor([3, 700]), noise=eps)
    assert torch.equal(yt, torch.logical_xor(y0.bool(), eps.bool()).float())
    with pytest.raises(ValueError, match="noise has shape"):
        k.q_sample(y0, 3, noise=eps[:1])


def test_schedule_buffers_and_surface():
    k = BernoulliKernel()
    torch.testing.assert_close(
        k.alphas_cumprod.double(), torch.cumprod(linear_alphas64(), 0), rtol=1e-5, atol=1e-9
    )
    assert k.alphas_cumprod.shape == (T,) and k.alphas_cumprod.dtype == torch.float32
    assert k.num_train_timesteps == T and k.objective == "eps" and k.lambda_bce == 1.0
    assert list(k.parameters()) == [] and k.state_dict() == {}
    assert k.learn_variance is False and k.model_output_channels(3) == 3
    m = torch.tensor([[[[0, 1]]]], dtype=torch.uint8)
    assert torch.equal(k.encode_mask(m), torch.tensor([[[[0.0, 1.0]]]]))
    assert torch.equal(k.decode_mask(torch.tensor([-0.5, 0.3, 1.5])), torch.tensor([0.0, 0.3, 1.0]))
    cos = BernoulliKernel(schedule="cosine", num_train_timesteps=50)
    assert cos.alphas_cumprod.shape == (50,) and bool((cos.alphas_cumprod.diff() < 0).all())


# ----------------------------------------------------------------------------- posterior and KL
ONE_STEP = [0, 1, 2, 100, 500, T - 1]  # t -> t - 1 (t = 0: -> y_0)
STRIDED = [(T - 1, 899), (T - 1, 0), (500, -1), (10, 3), (T - 1, 949), (120, 19), (3, 2)]


@pytest.mark.parametrize("pair", [(t, t - 1) for t in ONE_STEP] + STRIDED)
def test_posterior_matches_bayes_over_transition_matrices(pair):
    t, s = pair
    k = BernoulliKernel()
    alphas = linear_alphas64()
    y0 = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.3, 0.3, 0.9, 0.9]).view(8, 1, 1, 1)  # binary, then probabilities
    yt = torch.tensor([0.0, 1.0] * 4).view(8, 1, 1, 1)
    got = k.q_posterior(y0, yt, t, s).flatten().double()
    want = brute_posterior(alphas, t, s, y0.flatten().double(), yt.flatten().double())
    # float32 schedule and arithmetic: ~1e-5 relative on values down to ~1e-8
    torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-9)


def test_posterior_function_is_the_papers_formula():
    """theta_post from its definition with explicit [1 - y, y] channels, normalised over them."""
    g = torch.Generator().manual_seed(0)
    a, ab = torch.rand(50, generator=g, dtype=torch.float64), torch.rand(50, generator=g, dtype=torch.float64)
    yt = (torch.rand(50, generator=g) > 0.5).double()
    y0 = torch.rand(50, generator=g, dtype=torch.float64)
    left = a[:, None] * torch.stack([1 - yt, yt], 1) + (1 - a[:, None]) / 2
    right = ab[:, None] * torch.stack([1 - y0, y0], 1) + (1 - ab[:, None]) / 2
    prod = left * right
    torch.testing.assert_close(bernoulli_posterior(yt, y0, a, ab), prod[:, 1] / prod.sum(1))


def test_bernoulli_kl_matches_sum_over_outcomes():
    g = torch.Generator().manual_seed(0)
    q = torch.rand(200, generator=g, dtype=torch.float64) * 0.98 + 0.01
    p = torch.rand(200, generator=g, dtype=torch.float64) * 0.98 + 0.01
    want = sum(
        Bernoulli(probs=q).log_prob(torch.full_like(q, v)).exp()
        * (
            Bernoulli(probs=q).log_prob(torch.full_like(q, v))
            - Bernoulli(probs=p).log_prob(torch.full_like(q, v))
        )
        for v in (0.0, 1.0)
    )
    torch.testing.assert_close(bernoulli_kl(q, p), want, rtol=1e-10, atol=1e-12)
    # a {0, 1} target gives the negative log-likelihood; clamped model probabilities stay finite
    pp = torch.tensor([0.2, 0.7], dtype=torch.float64)
    nll = -torch.log(torch.tensor([0.2, 0.3], dtype=torch.float64))  # -log p(1), -log p(0)
    torch.testing.assert_close(bernoulli_kl(torch.tensor([1.0, 0.0], dtype=torch.float64), pp), nll)
    edge = bernoulli_kl(torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 1.0, 1.0]))
    assert bool(torch.isfinite(edge).all()) and float(edge[0]) == pytest.approx(-math.log(1e-7), rel=1e-3)


# ----------------------------------------------------------------------------- oracle sampling
@pytest.mark.parametrize("objective", ["eps", "x0"])
@pytest.mark.parametrize("num_steps", [1000, 50, 10, 1])
def test_oracle_recovers_y0_with_correct_marginals(num_steps, objective):
    k = BernoulliKernel(objective=objective)
    y0 = binary_y0(10_000 + num_steps)  # a seed apart from the chain's generator (same seed: prior = 1 - y0)
    x, x0_pred = run_chain(k, y0, num_steps, torch.Generator().manual_seed(num_steps))
    assert (x0_pred - y0).abs().max() <= 1e-4
    assert torch.equal(x, x0_pred), "the final step returns the probability x0_pred"
    assert k.decode_mask(x0_pred).equal(x0_pred)


def test_oracle_binarize_final_returns_a_binary_sample():
    k = BernoulliKernel()
    y0 = binary_y0(3)
    x, x0_pred = run_chain(
        k, y0, 10, torch.Generator().manual_seed(0), BernoulliPosterior(binarize_final=True)
    )
    assert torch.equal(x, y0) and (x0_pred - y0).abs().max() <= 1e-4


class _OneStepPosterior(BernoulliPosterior):
    """The MONAI / diffusers-before-#2076 trap: strided steps with the one-step posterior (alpha_t, abar_{t-1})."""

    def step(self, kernel, model_output, t, t_prev, x_t, generator=None, state=None):
        t = kernel.batch_timesteps(t, x_t.shape[0])
        return super().step(
            kernel,
            model_output,
            t,
            torch.where(kernel.batch_timesteps(t_prev, x_t.shape[0]) < 0, -1, t - 1),
            x_t,
            generator,
        )


def test_marginal_check_catches_one_step_posterior_when_strided():
    with pytest.raises(AssertionError, match="10 steps"):
        run_chain(BernoulliKernel(), binary_y0(1), 10, torch.Generator().manual_seed(0), _OneStepPosterior())


def test_first_inference_step_is_T_minus_1_for_every_step_count():
    k = BernoulliKernel()
    for n in range(1, T + 1):
        ts = k.inference_timesteps(n)
        assert ts.shape == (n,) and int(ts[0]) == T - 1 and int(ts[-1]) >= 0, n
        assert bool((ts.diff() < 0).all()), n
    assert torch.equal(k.inference_timesteps(T), torch.arange(T - 1, -1, -1))
    assert k.inference_timesteps(10).tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    for bad in (0, T + 1, 2.5, True):
        with pytest.raises(ValueError, match=r"\[1, 1000\]"):
            k.inference_timesteps(bad)


def test_step_accepts_int_and_per_sample_t():
    k, solver = BernoulliKernel(), BernoulliPosterior()
    x = binary_y0(0, (3, 1, 8, 8))
    out = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    t, tp = torch.tensor([999, 10, 5]), torch.tensor([500, 3, -1])
    batched = solver.step(k, out, t, tp, x, generator=torch.Generator().manual_seed(1))
    assert set(batched[0][:2].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(batched[0][2], batched[1][2])  # t_prev = -1: x_prev = x0_pred
    assert bool(((batched[1] >= 0) & (batched[1] <= 1)).all())
    a = solver.step(k, out, 999, 500, x, generator=torch.Generator().manual_seed(2))
    b = solver.step(
        k, out, torch.tensor(999), torch.tensor(500), x, generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(a[0], b[0])
    with pytest.raises(ValueError, match="shape"):
        solver.step(k, out, torch.tensor([1, 2]), 0, x)
    with pytest.raises(ValueError, match="one logit per mask channel"):
        solver.step(k, torch.cat([out, out], 1), t, tp, x)


def test_sampler_with_oracle_denoiser_returns_the_mask():
    """The kernel inside DiffusionSampler: a denoiser that knows the mask (its 'image') gives it back."""

    class Oracle(torch.nn.Module):
        def encode_condition(self, image):
            return image

        def forward(self, x, t, cond):
            return ORACLE_LOGIT * (2 * (x - cond).abs() - 1)

    mask = binary_y0(5, (2, 1, 16, 16))
    out = DiffusionSampler(num_steps=5, num_samples=3).sample(Oracle(), BernoulliKernel(), mask, 1)
    assert out["samples"].shape == (2, 3, 1, 16, 16)
    assert torch.equal(out["mask"].float(), mask) and (out["probability"] - mask).abs().max() <= 1e-4


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("objective", BERNOULLI_OBJECTIVES)
@pytest.mark.parametrize("t", [[0, 0], [T - 1, T - 1], [0, T - 1]])
def test_loss_finite_with_gradients(objective, t):
    k = BernoulliKernel(objective=objective)
    y0 = binary_y0(0, (2, 1, 8, 8))
    tb = torch.tensor(t)
    yt = k.q_sample(y0, tb, generator=torch.Generator().manual_seed(0))
    out = (torch.randn(y0.shape, generator=torch.Generator().manual_seed(1)) * 3).requires_grad_()
    terms = k.loss(out, y0, yt, tb)
    want = {
        "eps": {"loss", "kl", "bce"},
        "eps_kl": {"loss", "kl"},
        "eps_bce": {"loss", "bce"},
        "x0": {"loss", "kl", "bce"},
    }
    assert set(terms) == want[objective]
    assert all(v.ndim == 0 and bool(torch.isfinite(v)) for v in terms.values())
    terms["loss"].backward()
    assert bool(torch.isfinite(out.grad).all()) and torch.count_nonzero(out.grad) > 0
    # confident, wrong logits stay finite too
    wrong = (-oracle_logits(k, yt, y0) * 5).requires_grad_()
    terms = k.loss(wrong, y0, yt, tb)
    terms["loss"].backward()
    assert bool(torch.isfinite(terms["loss"])) and bool(torch.isfinite(wrong.grad).all())


def test_lambda_bce_weights_the_bce_term():
    y0 = binary_y0(0, (4, 1, 8, 8))
    tb = torch.tensor([0, 5, 500, T - 1])
    yt = BernoulliKernel().q_sample(y0, tb, generator=torch.Generator().manual_seed(0))
    out = torch.randn(y0.shape, generator=torch.Generator().manual_seed(1))
    for objective in ("eps", "x0"):
        a = BernoulliKernel(objective=objective, lambda_bce=0.5).loss(out, y0, yt, tb)
        b = BernoulliKernel(objective=objective, lambda_bce=2.0).loss(out, y0, yt, tb)
        torch.testing.assert_close(a["kl"], b["kl"])
        torch.testing.assert_close(b["loss"] - a["loss"], 1.5 * a["bce"])
        torch.testing.assert_close(a["loss"], a["kl"] + 0.5 * a["bce"])
    kl_only = BernoulliKernel(objective="eps_kl").loss(out, y0, yt, tb)
    bce_only = BernoulliKernel(objective="eps_bce").loss(out, y0, yt, tb)
    full = BernoulliKernel().loss(out, y0, yt, tb)
    torch.testing.assert_close(kl_only["loss"], full["kl"])
    torch.testing.assert_close(bce_only["loss"], full["bce"])


def test_loss_terms_match_independent_computation():
    """BCE against eps = y0 XOR yt (or y0); KL against the brute-force posteriors; NLL at t = 0."""
    alphas = linear_alphas64()
    y0 = binary_y0(0, (4, 1, 4, 4))
    tb = torch.tensor([0, 1, 300, T - 1])
    k = BernoulliKernel()
    yt = k.q_sample(y0, tb, generator=torch.Generator().manual_seed(0))
    out = torch.randn(y0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    for objective in ("eps", "x0"):
        k = BernoulliKernel(objective=objective)
        eps_hat = torch.sigmoid(out.double())
        x0_hat = eps_hat if objective == "x0" else (yt.double() - eps_hat).abs()
        target = y0.double() if objective == "x0" else torch.logical_xor(y0.bool(), yt.bool()).double()
        bce = -(target * eps_hat.log() + (1 - target) * (1 - eps_hat).log()).mean()
        kls = []
        for i, t in enumerate(tb.tolist()):
            if t == 0:
                kls.append(
                    -(y0[i].double() * x0_hat[i].log() + (1 - y0[i].double()) * (1 - x0_hat[i]).log()).mean()
                )
                continue
            y, ytv = y0[i].flatten().double(), yt[i].flatten().double()
            q = brute_posterior(alphas, t, t - 1, y, ytv)
            p = brute_posterior(alphas, t, t - 1, x0_hat[i].flatten(), ytv)
            kls.append((q * (q / p).log() + (1 - q) * ((1 - q) / (1 - p)).log()).mean())
        kl = torch.stack(kls).mean()
        terms = k.loss(out, y0, yt, tb)
        torch.testing.assert_close(terms["bce"].double(), bce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(terms["kl"].double(), kl, rtol=1e-3, atol=1e-6)


def test_loss_oracle_is_near_zero_and_detects_errors():
    k = BernoulliKernel()
    y0 = binary_y0(0, (4, 1, 16, 16))
    tb = torch.tensor([0, 3, 400, T - 1])
    yt = k.q_sample(y0, tb, generator=torch.Generator().manual_seed(0))
    good = k.loss(oracle_logits(k, yt, y0), y0, yt, tb)
    bad = k.loss(-oracle_logits(k, yt, y0), y0, yt, tb)
    assert float(good["bce"]) < 1e-6 and float(good["kl"]) < 1e-6
    assert float(bad["bce"]) > 10 and float(bad["kl"]) > 0.1


def test_step_and_loss_do_not_sync_host(monkeypatch):
    """No .item(), bool(tensor), int(tensor) or tolist() inside a solver step or the loss (no host sync per step)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside the kernel")

    y0 = binary_y0(0, (2, 1, 8, 8))
    t, tp = torch.tensor([10, 0]), torch.tensor([5, -1])
    pairs = [(BernoulliKernel(objective=o), BernoulliPosterior()) for o in BERNOULLI_OBJECTIVES] + [
        (BernoulliKernel(), BernoulliPosterior(binarize_final=True))
    ]
    for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for k, solver in pairs:
        out = torch.zeros(y0.shape)
        solver.step(k, out, t, tp, y0)
        k.loss(out, y0, k.q_sample(y0, t), t)


# ----------------------------------------------------------------------------- randomness, options, config
def test_generator_reproducibility():
    k, solver = BernoulliKernel(), BernoulliPosterior()
    y0 = binary_y0(0, (2, 1, 16, 16))

    def sample(seed: int):
        g = torch.Generator().manual_seed(seed)
        ts = k.sample_timesteps(2, "cpu", generator=g)
        yt = k.q_sample(y0, ts, generator=g)
        x = k.sample_prior(y0.shape, "cpu", generator=g)
        for t, tp in ((999, 500), (500, 10), (10, -1)):
            x, _ = solver.step(k, torch.randn(x.shape, generator=g), t, tp, x, generator=g)
        return ts, yt, x

    a, b, c = sample(0), sample(0), sample(1)
    for u, w in zip(a, b, strict=True):
        assert torch.equal(u, w)
    assert not torch.equal(a[1], c[1]) and not torch.equal(a[2], c[2])
    prior = k.sample_prior((100_000,), "cpu", generator=torch.Generator().manual_seed(0))
    assert set(prior.unique().tolist()) == {0.0, 1.0}
    assert abs(float(prior.mean()) - 0.5) <= Z * math.sqrt(0.25 / 100_000)
    ts = k.sample_timesteps(10_000, "cpu", generator=torch.Generator().manual_seed(0))
    assert ts.dtype == torch.long and int(ts.min()) == 0 and int(ts.max()) == T - 1


@pytest.mark.parametrize(
    "kwargs,valid",
    [
        ({"objective": "epsilon"}, r"\['eps', 'eps_kl', 'eps_bce', 'x0'\]"),
        ({"schedule": "quadratic"}, r"\['linear', 'cosine'\]"),
        ({"lambda_bce": -1.0}, ">= 0"),
        ({"lambda_bce": "1"}, ">= 0"),
        ({"num_train_timesteps": 0}, "positive"),
    ],
)
def test_bad_options(kwargs, valid):
    with pytest.raises(ValueError, match=valid):
        BernoulliKernel(**kwargs)


def test_config_instantiates_the_defaults(tmp_path):
    cfg = compose_config("train", ["noise=bernoulli", "model=berdiff"], tmp_path)
    k = instantiate(cfg.noise)
    ref = BernoulliKernel(objective="x0")  # the config's fast default; the class keeps the paper's eps
    assert isinstance(k, BernoulliKernel) and k.extra_repr() == ref.extra_repr()
    torch.testing.assert_close(k.alphas_cumprod, ref.alphas_cumprod)
    assert cfg.model.denoiser.out_channels == k.model_output_channels(cfg.data.mask_channels)
