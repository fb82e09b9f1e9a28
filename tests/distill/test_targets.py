"""Distillation targets against closed forms on Gaussian data, and two tiny distillations that must work.

For data x ~ N(M, S^2) the ideal denoiser is affine, x_hat = c(lambda) z + d(lambda), so every DDIM step
is an affine map of z and the progressive-distillation target has a closed form, derived here by hand
(not through `ddim_step`).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cascade.diffusion.analytic import GaussianDenoiser
from cascade.diffusion.param import append_dims, eps_from_x, v_from_x
from cascade.diffusion.schedule import CosineSchedule, alpha_sigma
from cascade.distill import distillation_loss, guided_target, progressive_target, sample_student_levels
from cascade.nn.embeddings import ScalarEmbedding
from cascade.sampling.samplers import sample_ddim
from cascade.sampling.steps import ddim_step, time_grid

M, S = 0.3, 0.5
SCHED = CosineSchedule(-20.0, 20.0)
DATA = GaussianDenoiser(M, S)
f64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # the training tests run tiny matmuls, where thread contention on a shared machine costs 10x
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- closed forms for Gaussian data

def ab(lam: float) -> tuple[float, float]:
    return math.sqrt(1 / (1 + math.exp(-lam))), math.sqrt(1 / (1 + math.exp(lam)))


def lam_at(t: float) -> float:
    return float(SCHED(torch.tensor(t, dtype=f64)))


def denoiser_affine(lam: float) -> tuple[float, float]:
    """x_hat = c z + d for N(M, S^2) data: c = alpha S^2 / (alpha^2 S^2 + sigma^2), d = M (1 - c alpha)."""
    a, s = ab(lam)
    c = a * S ** 2 / (a ** 2 * S ** 2 + s ** 2)
    return c, M * (1 - c * a)


def ddim_affine(lam_t: float, lam_s: float) -> tuple[float, float]:
    """DDIM with the ideal denoiser, z_s = A z_t + B: z_s = r z_t + (alpha_s - r alpha_t) x_hat, r = sigma_s/sigma_t."""
    (a_t, s_t), (a_s, s_s) = ab(lam_t), ab(lam_s)
    r = s_s / s_t
    c, d = denoiser_affine(lam_t)
    return r + (a_s - r * a_t) * c, (a_s - r * a_t) * d


def closed_form(i: int, n: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(target x~ = P z_t + Q, teacher two-step z_t'' = P2 z_t + Q2) at student level i of n."""
    lt, lm, ls = lam_at(1 - i / n), lam_at(1 - (i + 0.5) / n), lam_at(1 - (i + 1) / n)
    A1, B1 = ddim_affine(lt, lm)
    A2, B2 = ddim_affine(lm, ls)
    P2, Q2 = A2 * A1, A2 * B1 + B2
    if i == n - 1:  # last step: the teacher sampler's output x_hat(z_t') = c_mid (A1 z + B1) + d_mid
        c, d = denoiser_affine(lm)
        return (c * A1, c * B1 + d), (P2, Q2)
    (a_t, s_t), (a_s, s_s) = ab(lt), ab(ls)
    r = s_s / s_t
    den = a_s - r * a_t  # x~ = (z'' - r z_t) / (alpha'' - r alpha_t) (PD Alg. 2)
    return ((P2 - r) / den, Q2 / den), (P2, Q2)


def levels_and_z(n: int, per_level: int = 3, dim: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(n).repeat(per_level)  # every level, mixed in one batch
    return i, 1.5 * torch.randn(i.shape[0], dim, dtype=f64)


# ---------------------------------------------------------------- 1. exact targets

@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_target_is_closed_form_two_teacher_steps(n):
    i, z = levels_and_z(n)
    x_target, lam = progressive_target(DATA, z, i, n, SCHED)
    assert x_target.shape == z.shape and x_target.dtype == f64 and lam.shape == (z.shape[0],)
    expect_x, expect_z2 = torch.empty_like(z), torch.empty_like(z)
    for b, k in enumerate(i.tolist()):
        (P, Q), (P2, Q2) = closed_form(k, n)
        expect_x[b], expect_z2[b] = P * z[b] + Q, P2 * z[b] + Q2
        assert lam[b].item() == pytest.approx(lam_at(1 - k / n), abs=1e-12)
    torch.testing.assert_close(x_target, expect_x, atol=1e-9, rtol=0)  # measured 5e-15

    # defining property: ONE student DDIM step t -> t'' with x_hat = x~ lands on the teacher's z_t''
    inner = i < n - 1
    if inner.any():
        lam_s = torch.tensor([lam_at(1 - (k + 1) / n) for k in i.tolist()], dtype=f64)
        z2 = ddim_step(z[inner], x_target[inner], lam[inner], lam_s[inner])
        torch.testing.assert_close(z2, expect_z2[inner], atol=1e-9, rtol=0)  # measured 2e-15


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_oracle_student_reproduces_teacher_sampler(n):
    """The student that predicts x~ exactly, sampled with N DDIM steps, IS the teacher's 2N-step DDIM sampler
    (the last step included: the sampler returns x_hat there, so the target is x_hat(z_t'))."""
    z1 = torch.randn(16, 4, dtype=f64)
    oracle = lambda z, lam, step: progressive_target(DATA, z, step, n, SCHED)[0]  # noqa: E731
    student = sample_ddim(oracle, z1, time_grid(n, SCHED))
    teacher = sample_ddim(lambda z, lam, step: DATA(z, lam), z1, time_grid(2 * n, SCHED))
    torch.testing.assert_close(student, teacher, atol=1e-9, rtol=0)  # measured 9e-16


def test_levels_argument():
    z = torch.randn(4, 3, dtype=f64)
    by_int, _ = progressive_target(DATA, z, 1, 4, SCHED)
    by_tensor, _ = progressive_target(DATA, z, torch.ones(4, dtype=torch.int64), 4, SCHED)
    torch.testing.assert_close(by_int, by_tensor, atol=0, rtol=0)
    for bad in (torch.tensor([0, 1, 2, 4]), torch.tensor([-1, 0, 0, 0]), torch.zeros(3, dtype=torch.int64)):
        with pytest.raises(ValueError):
            progressive_target(DATA, z, bad, 4, SCHED)
    # float32 inputs: float32 target and levels (the samplers' dtype), same values
    x32, lam32 = progressive_target(DATA, z.float(), 1, 4, SCHED)
    assert x32.dtype == lam32.dtype == torch.float32
    torch.testing.assert_close(x32, by_int.float(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- 2. wrong bookkeeping is caught

def two_step_target(z, lam_t, lam_a, lam_b, lam_s):
    """Alg. 2 with arbitrary levels: teacher DDIM t -> a -> b, then x~ for one student step t -> s."""
    z_a = ddim_step(z, DATA(z, lam_t), lam_t, lam_a)
    z_b = ddim_step(z_a, DATA(z_a, lam_a), lam_a, lam_b)
    (a_t, s_t), (a_s, s_s) = ab(lam_t), ab(lam_s)
    r = s_s / s_t
    return (z_b - r * z) / (a_s - r * a_t)


def test_wrong_bookkeeping_gives_a_different_target():
    n, k = 4, 1
    z = torch.randn(64, dtype=f64)[:, None]
    right, _ = progressive_target(DATA, z, k, n, SCHED)
    t = 1 - k / n
    lt, lm, ls = lam_at(t), lam_at(t - 0.5 / n), lam_at(t - 1 / n)
    torch.testing.assert_close(two_step_target(z, lt, lm, ls, ls), right, atol=1e-9, rtol=0)  # the helper is right
    wrong = {
        # t' and t'' swapped: the teacher goes t -> t'' -> t' (diffusers#1010 review)
        "swapped": two_step_target(z, lt, ls, lm, ls),
        # a continuous student time instead of the grid point 1 - i/N
        "continuous t": two_step_target(z, lam_at(t - 0.3 / n), lam_at(t - 0.8 / n), lam_at(t - 1.3 / n),
                                        lam_at(t - 1.3 / n)),
        # the reference's t = (i_ref + 1)/N read with our i, i.e. no i_ref = N-1-i flip
        "unflipped index": two_step_target(z, lam_at((k + 1) / n), lam_at((k + 0.5) / n), lam_at(k / n),
                                           lam_at(k / n)),
    }
    for name, x in wrong.items():
        assert (x - right).abs().max() > 1e-2, name
    # last step: x_hat(z_t) instead of the teacher sampler's x_hat(z_t') drops half a teacher step
    last, _ = progressive_target(DATA, z, n - 1, n, SCHED)
    assert (DATA(z, lam_at(1 / n)) - last).abs().max() > 1e-2


# ---------------------------------------------------------------- toy student network

class ToyVNet(nn.Module):
    """Per-element v-prediction net, x_hat = alpha z - sigma v (PD sec. 4), with FiLM conditioning on the noise
    level and, optionally, on the guidance weight through a zero-initialised Fourier embedding (like the U-Net).

    The level enters as t = schedule.t(lambda) in [0, 1] rather than lambda itself, so that continuous-time
    training covers the SNR ~ 0 top step (lambda = -20 is reached only for t within ~1e-4 of 1).
    """

    def __init__(self, width: int = 32, guidance: bool = False) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(1, width), nn.Linear(width, 1)
        self.noise_emb = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
        self.guidance_emb = ScalarEmbedding(width, scale=10.0, num_features=16, zero_init=True) if guidance else None
        self.film = nn.Linear(width, 2 * width)
        self.double()

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        # z: (B, D); logsnr, w: (B,)
        logsnr = logsnr.to(z.dtype)
        emb = self.noise_emb(SCHED.t(logsnr)[:, None])  # (B, width)
        if w is not None:
            emb = emb + self.guidance_emb(w)
        scale, shift = self.film(F.silu(emb))[:, None].chunk(2, dim=-1)  # (B, 1, width) each
        v = self.out(F.silu(self.inp(z[..., None]) * (1 + scale) + shift)).squeeze(-1)
        alpha, sigma = (append_dims(c, z.ndim) for c in alpha_sigma(logsnr))
        return alpha * z - sigma * v


def noisy(x: torch.Tensor, logsnr: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    alpha, sigma = (append_dims(c, x.ndim) for c in alpha_sigma(logsnr))
    return alpha * x + sigma * torch.randn(x.shape, generator=gen, dtype=x.dtype)  # z_t ~ q(z_t | x)


# ---------------------------------------------------------------- 3. progressive distillation 8 -> 4 -> 2

def distill_round(student, teacher, num_steps, iters, gen, batch=64, dim=8, lr=3e-3):
    """One halving of PD Alg. 2: the student (N steps) matches two DDIM steps of the teacher (2N steps)."""
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / iters)  # linear to 0, as PD
    grid = time_grid(num_steps, SCHED)
    for _ in range(iters):
        i = sample_student_levels(batch, num_steps, gen)
        z = noisy(DATA.sample((batch, dim), gen), grid[i], gen)
        x_target, lam = progressive_target(teacher, z, i, num_steps, SCHED)
        loss = distillation_loss(student(z, lam), x_target, lam, "truncated_snr").mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return student


def test_progressive_distillation_two_halvings():
    """8-step DDIM teacher (the exact denoiser) -> 4-step student -> 2-step student, 1500 Adam steps each.

    Measured on the same 256 x 16 z_1 draws (mean |student - teacher| per sample), over 3 seeds: 2-step
    student 0.0020-0.0026 mean, <= 0.0044 worst sample (4-step student alike); the teacher's own 2-step
    DDIM 0.17 mean, 0.24-0.27 worst. Asserted (data std 0.5): worst sample < 0.015, mean < 0.008 for both
    students, and 2-step student / teacher 2-step error < 0.05 (measured 0.012-0.016).
    """
    gen = torch.Generator().manual_seed(0)
    # round 1: the teacher is analytic, so the student starts fresh
    student4 = distill_round(ToyVNet(), DATA, 4, 1500, gen)
    # round 2: the student starts from its teacher, the frozen round-1 student
    teacher4 = copy.deepcopy(student4).requires_grad_(False)
    student2 = distill_round(student4, teacher4, 2, 1500, gen)

    z1 = torch.randn(256, 16, generator=gen, dtype=f64)
    as_model = lambda net: (lambda z, lam, step: net(z, lam))  # noqa: E731
    with torch.no_grad():
        teacher8 = sample_ddim(as_model(DATA), z1, time_grid(8, SCHED))
        out4 = sample_ddim(as_model(teacher4), z1, time_grid(4, SCHED))
        out2 = sample_ddim(as_model(student2), z1, time_grid(2, SCHED))
        naive2 = sample_ddim(as_model(DATA), z1, time_grid(2, SCHED))
    err = lambda out: (out - teacher8).abs().mean(dim=1)  # noqa: E731  (256,) per sample
    assert err(out4).max() < 0.015 and err(out4).mean() < 0.008
    assert err(out2).max() < 0.015 and err(out2).mean() < 0.008
    assert err(out2).mean() < 0.05 * err(naive2).mean()


# ---------------------------------------------------------------- 4. guidance distillation

def test_guidance_distillation_generalises_over_w():
    """Stage 1 of Meng et al.: a w-conditioned student matches (1 + w) x_c - w x_u for w ~ U[0, 4].

    Teachers: conditional data N(0.5, 0.3^2), unconditional N(0, 0.6^2). The student is first fitted to the
    conditional teacher (its "pretrained" init, 300 steps, guidance embedding unused), then trained 2000 steps
    on continuous w. Measured at held-out w in {0.5, 2.5, 3.7} on 11 levels t in [0, 1] (top step included),
    z ~ q(z_t | conditional data), over 4 seeds: mean |x_student - x_guided| 0.006-0.014, worst level mean
    <= 0.033; relative to the guidance effect mean |x_guided - x_cond| (0.16, 0.79, 1.17 at these w)
    <= 0.047. Asserted: mean < 0.03, every level's mean < 0.07, and mean < 0.1 x the guidance effect.
    """
    cond, uncond = GaussianDenoiser(0.5, 0.3), GaussianDenoiser(0.0, 0.6)
    gen = torch.Generator().manual_seed(1)
    net = ToyVNet(guidance=True)
    batch, dim = 64, 8

    def draw():
        lam = SCHED(torch.rand(batch, generator=gen, dtype=f64))  # continuous t ~ U[0, 1]
        return noisy(cond.sample((batch, dim), gen), lam, gen), lam

    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(300):  # the teacher's conditional model, without the guidance embedding
        z, lam = draw()
        loss = distillation_loss(net(z, lam), cond(z, lam), lam).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    z, lam = draw()
    with torch.no_grad():  # the zero-initialised embedding leaves the pretrained model unchanged
        torch.testing.assert_close(net(z, lam, torch.full((batch,), 3.0, dtype=f64)), net(z, lam), atol=0, rtol=0)

    iters = 2000
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / iters)
    for _ in range(iters):
        z, lam = draw()
        w = 4.0 * torch.rand(batch, generator=gen, dtype=f64)  # continuous: no held-out value is ever seen
        loss = distillation_loss(net(z, lam, w), guided_target(cond, uncond, z, lam, w), lam).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    ts = torch.linspace(0.0, 1.0, 11, dtype=f64)
    for w_value in (0.5, 2.5, 3.7):
        errs, effect = [], []
        for t in ts:
            lam = SCHED(t).expand(256)
            z = noisy(cond.sample((256, 4), gen), lam, gen)
            w = torch.full((256,), w_value, dtype=f64)
            target = guided_target(cond, uncond, z, lam, w)
            with torch.no_grad():
                errs.append((net(z, lam, w) - target).abs().mean())
            effect.append((target - cond(z, lam)).abs().mean())
        errs, effect = torch.stack(errs), torch.stack(effect)
        assert errs.mean() < 0.03 and errs.max() < 0.07, (w_value, errs)
        assert errs.mean() < 0.1 * effect.mean(), (w_value, errs.mean(), effect.mean())


def test_guided_target_is_cfg():
    cond, uncond = GaussianDenoiser(0.5, 0.3), GaussianDenoiser(0.0, 0.6)
    z, lam = torch.randn(3, 4, dtype=f64), torch.tensor([-5.0, 0.0, 5.0], dtype=f64)
    w = torch.tensor([0.0, 1.5, 4.0], dtype=f64)
    expect = (1 + w[:, None]) * cond(z, lam) - w[:, None] * uncond(z, lam)
    torch.testing.assert_close(guided_target(cond, uncond, z, lam, w), expect, atol=1e-12, rtol=0)
    torch.testing.assert_close(guided_target(cond, uncond, z, lam, 0.0), cond(z, lam), atol=1e-12, rtol=0)


# ---------------------------------------------------------------- 5. loss weights

LAMS = [-20.0, -3.0, 0.0, 0.5, 5.0, 20.0]


def test_distillation_loss_weights():
    """w = max(SNR, 1) (truncated SNR) or 1 + SNR, and the PD sec. 4 identities
    max(SNR, 1) ||x - x_hat||^2 = max(||x - x_hat||^2, ||eps - eps_hat||^2), (1 + SNR) ||x - x_hat||^2 = ||v - v_hat||^2."""
    lam = torch.tensor(LAMS, dtype=f64)
    x_t, x_hat, z = torch.randn(3, len(LAMS), 2, 3, dtype=f64).unbind(0)
    mse = (x_t - x_hat).square().flatten(1).mean(1)
    snr = torch.tensor([math.exp(v) for v in LAMS], dtype=f64)
    trunc = distillation_loss(x_hat, x_t, lam, "truncated_snr")
    torch.testing.assert_close(trunc, torch.maximum(snr, torch.ones_like(snr)) * mse, rtol=1e-12, atol=0)
    torch.testing.assert_close(distillation_loss(x_hat, x_t, lam, "snr+1"), (1 + snr) * mse, rtol=1e-12, atol=0)
    torch.testing.assert_close(distillation_loss(x_hat, x_t, lam), trunc, rtol=0, atol=0)  # the default

    alpha, sigma = (append_dims(c, z.ndim) for c in alpha_sigma(lam))
    mse_eps = (eps_from_x(z, x_t, alpha, sigma) - eps_from_x(z, x_hat, alpha, sigma)).square().flatten(1).mean(1)
    mse_v = (v_from_x(z, x_t, alpha, sigma) - v_from_x(z, x_hat, alpha, sigma)).square().flatten(1).mean(1)
    torch.testing.assert_close(trunc, torch.maximum(mse, mse_eps), rtol=1e-6, atol=0)
    torch.testing.assert_close(distillation_loss(x_hat, x_t, lam, "snr+1"), mse_v, rtol=1e-6, atol=0)

    loss32 = distillation_loss(x_hat.float(), x_t.float(), lam.float())
    assert loss32.dtype == torch.float32 and torch.isfinite(loss32).all()
    with pytest.raises(ValueError):
        distillation_loss(x_hat, x_t, lam, "snr")  # eps-MSE weighting: zero weight at SNR 0 (PD sec. 4)


def test_sample_student_levels():
    gen = torch.Generator().manual_seed(3)
    i = sample_student_levels(8000, 4, gen)
    assert i.shape == (8000,) and i.dtype == torch.int64 and i.min() == 0 and i.max() == 3
    counts = torch.bincount(i, minlength=4)
    assert ((counts - 2000).abs() < 200).all(), counts  # 200 ~ 5 standard deviations
    torch.testing.assert_close(sample_student_levels(8, 4, torch.Generator().manual_seed(3)), i[:8])
    with pytest.raises(ValueError):
        sample_student_levels(8, 0)
