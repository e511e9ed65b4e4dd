"""Consistency distillation learns: on a Gaussian mixture with an exact teacher, a briefly distilled
S-step student samples the data distribution better than the teacher's own S-step Euler sampler."""

import math

import pytest
import torch

from generate_images import consistency_sampler
from training.loss_cd import EDMConsistencyDistillLoss

#----------------------------------------------------------------------------
# The problem: a 2-D Gaussian mixture stored as [N, 2, 1, 1] "images", and its exact denoiser.

MODE_MEANS = [[0.7, 0.0], [0.0, 0.7], [-0.7, 0.0], [0.0, -0.7]]
MODE_WEIGHTS = [0.4, 0.3, 0.2, 0.1]
MODE_STD = 0.05
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def as_images(points):
    return points.reshape(-1, 2, 1, 1)


def sample_mixture(num, generator):
    means, weights = torch.tensor(MODE_MEANS), torch.tensor(MODE_WEIGHTS)
    modes = torch.multinomial(weights, num, replacement=True, generator=generator)
    return as_images(means[modes] + MODE_STD * torch.randn(num, 2, generator=generator))


def sigma_column(sigma, x):
    """sigma given as a scalar, [N] or [N,1,1,1], as a float64 [N or 1, 1] column."""
    return torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)


class MixtureDenoiser(torch.nn.Module):
    """E[y | y + sigma * eps = x] for the mixture, in closed form (computed in float64)."""

    def __init__(self):
        super().__init__()
        self.register_buffer('means', torch.tensor(MODE_MEANS, dtype=torch.float64))
        self.register_buffer('log_weights', torch.tensor(MODE_WEIGHTS, dtype=torch.float64).log())

    def forward(self, x, sigma, class_labels=None):
        points = x.to(torch.float64).flatten(1)                              # [N, 2]
        var_x = MODE_STD ** 2 + sigma_column(sigma, x) ** 2                  # Var of x within a mode
        sq_dist = (points[:, None, :] - self.means[None]).square().sum(-1)   # [N, K]
        # All modes share var_x, so the Gaussian normalisers cancel in the softmax.
        responsibility = (self.log_weights - 0.5 * sq_dist / var_x).softmax(dim=1)
        shrink = (MODE_STD ** 2 / var_x)[:, :, None]  # E[y | x, mode k] = mu_k + shrink * (x - mu_k)
        per_mode = self.means[None] + shrink * (points[:, None, :] - self.means[None])
        return (responsibility[:, :, None] * per_mode).sum(1).to(x.dtype).reshape(x.shape)

#----------------------------------------------------------------------------
# The student: EDM preconditioning around a small MLP.

class MLPDenoiser(torch.nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) with EDM's coefficients and an MLP as F."""

    def __init__(self, hidden=128, num_freqs=8, sigma_data=0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.register_buffer('freqs', 2.0 ** torch.arange(num_freqs, dtype=torch.float32) / 4)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(2 + 2 * num_freqs, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, 2))

    def forward(self, x, sigma, class_labels=None):
        points = x.to(torch.float32).flatten(1)
        sigma = sigma_column(sigma, x).to(torch.float32).expand(points.shape[0], 1)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sigma ** 2 + sd ** 2).sqrt()
        c_noise = sigma.log() / 4
        phase = c_noise * self.freqs
        features = torch.cat([c_in * points, phase.sin(), phase.cos()], dim=1)
        return (c_skip * points + c_out * self.mlp(features)).reshape(x.shape)

#----------------------------------------------------------------------------
# Training.

def fit_to_teacher(student, teacher, steps, batch_size, lr, generator):
    """Plain denoising regression onto the exact denoiser, weighted by 1/c_out^2 as in EDM.

    ln(sigma) ~ N(-0.4, 1.6^2) covers the whole sampling range [sigma_min, sigma_max].
    """
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    for _ in range(steps):
        y = sample_mixture(batch_size, generator)
        sigma = (torch.randn(batch_size, generator=generator) * 1.6 - 0.4).exp()
        x = y + sigma.reshape(-1, 1, 1, 1) * torch.randn(y.shape, generator=generator)
        with torch.no_grad():
            target = teacher(x, sigma)
        weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
        loss = (weight.reshape(-1, 1, 1, 1) * (student(x, sigma) - target).square()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def distil(student, loss_fn, steps, batch_size, lr, generator):
    """Adam on the CD loss; returns the mean loss of every step."""
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    history = []
    for step in range(steps):
        loss_fn.set_progress(step * batch_size)
        loss = loss_fn(student, sample_mixture(batch_size, generator)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    return history

#----------------------------------------------------------------------------
# Distances to the true mixture, on point clouds of shape [N, 2].

def sliced_wasserstein(a, b, num_projections=256, seed=0):
    """Mean over random directions of the 1-D Wasserstein-1 distance between equal-size point clouds."""
    angles = torch.rand(num_projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * math.pi
    directions = torch.stack([angles.cos(), angles.sin()], dim=1)
    proj_a = (a.double() @ directions.T).sort(dim=0).values
    proj_b = (b.double() @ directions.T).sort(dim=0).values
    return (proj_a - proj_b).abs().mean().item()


def energy_distance(a, b):
    a, b = a.double(), b.double()
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


def mode_statistics(points):
    """Mean distance to the nearest mode mean, and the fraction of points within 3 mode stds of one."""
    nearest = torch.cdist(points.double(), torch.tensor(MODE_MEANS, dtype=torch.float64)).min(dim=1).values
    return nearest.mean().item(), (nearest < 3 * MODE_STD).double().mean().item()


def distribution_report(points, truth):
    sw = sliced_wasserstein(points, truth)
    nearest, on_mode = mode_statistics(points)
    return dict(sliced_w1=sw, energy=energy_distance(points, truth), nearest_mode=nearest, on_mode=on_mode)

#----------------------------------------------------------------------------
# Tests.

def test_mixture_denoiser_is_posterior_mean():
    generator = torch.Generator().manual_seed(0)
    y = sample_mixture(400_000, generator).flatten(1).double()
    teacher = MixtureDenoiser().eval()
    x = torch.tensor([[0.3, 0.2], [-0.6, 0.1], [0.05, -0.8], [0.4, 0.4]], dtype=torch.float64)
    for sigma in (0.1, 0.5, 2.0):
        # Self-normalised importance sampling: E[y | x] = E_y[y p(x|y)] / E_y[p(x|y)].
        log_lik = -0.5 * torch.cdist(x, y).square() / sigma ** 2
        mc_mean = log_lik.softmax(dim=1) @ y
        exact = teacher(as_images(x), torch.full([len(x)], sigma)).flatten(1)
        assert torch.allclose(exact, mc_mean, atol=0.02), (sigma, exact, mc_mean)
    # sigma as a scalar, [N] and [N,1,1,1] give the same answer.
    images = as_images(x).float()
    by_vector = teacher(images, torch.full([len(x)], 0.3))
    assert torch.equal(teacher(images, torch.tensor(0.3)), by_vector)
    assert torch.equal(teacher(images, torch.full([len(x), 1, 1, 1], 0.3)), by_vector)


def distillation_experiment(seed, S=2, batch_size=256, num_samples=4000, fit_steps=300, cd_steps=500):
    """Fit a student to the teacher, distil it, and report S-step sampling quality before and after.

    Returns (CD loss per step, {name: distribution_report}) for the teacher's S-step Euler sampler,
    the student before and after distillation, and a second true sample as the best attainable.
    """
    torch.manual_seed(seed)  # the loss draws edges and noise from the global generator
    generator = torch.Generator().manual_seed(seed)
    teacher = MixtureDenoiser().eval()
    student = MLPDenoiser()
    fit_to_teacher(student, teacher, fit_steps, batch_size, lr=1e-3, generator=generator)

    noise = torch.randn(num_samples, 2, 1, 1, generator=generator)
    truth = sample_mixture(num_samples, generator).flatten(1)
    def sample_report(net):
        with torch.no_grad():
            points = consistency_sampler(net, noise, num_steps=S, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO)
        return distribution_report(points.flatten(1), truth)

    reports = dict(teacher_euler=sample_report(teacher), before=sample_report(student.eval()))
    # T_start = 2S so that every segment holds several teacher edges; with 256 images per step the
    # anneal to T_end is over after ~200 steps. Loss, weighting and edge sampling are the defaults.
    loss_fn = EDMConsistencyDistillLoss(teacher, S=S, T_start=2 * S, T_end=16, T_anneal_kimg=50,
        sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, report_stats=False)
    history = distil(student.train(), loss_fn, cd_steps, batch_size, lr=1e-3, generator=generator)
    reports['after'] = sample_report(student.eval())
    reports['reference'] = distribution_report(sample_mixture(num_samples, generator).flatten(1), truth)
    return history, reports


@pytest.mark.slow
def test_distilled_student_beats_teacher_euler(single_thread):
    # S = 2: the teacher's first Euler step lands at sigma_min on the mixture mean, so its 2-step
    # samples pile up between modes, while a consistency student can learn to jump straight onto them.
    history, reports = distillation_experiment(seed=0)
    teacher_euler, before, after = reports['teacher_euler'], reports['before'], reports['after']

    assert all(math.isfinite(value) for value in history), history
    # Seeds 0-5 gave after/teacher ratios of 0.25-0.35 (sliced W1), 0.07-0.14 (energy) and
    # 0.42-0.54 (nearest mode), and before/teacher 0.84-0.92 (sliced W1); the bounds leave room.
    # The metric resolves the gap: a second true sample is far closer than the teacher's samples.
    assert reports['reference']['sliced_w1'] < 0.2 * teacher_euler['sliced_w1'], reports
    # Fitting alone reproduces the teacher's few-step failure; distillation is what fixes it.
    assert before['sliced_w1'] > 0.75 * teacher_euler['sliced_w1'], reports
    assert after['sliced_w1'] < 0.6 * teacher_euler['sliced_w1'], reports
    assert after['energy'] < 0.4 * teacher_euler['energy'], reports
    assert after['nearest_mode'] < 0.75 * teacher_euler['nearest_mode'], reports
    assert after['on_mode'] > teacher_euler['on_mode'] + 0.05, reports
