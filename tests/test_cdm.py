"""--method=cdm: EDM2's loss plus the consistency term of Consistent Diffusion Models (training/loss_cdm.py)."""

import os
import pickle

import click
import pytest
import torch

import dnnlib
import train_edm2
from generate_images import edm_sampler
from helpers import (MLPDenoiser, MixtureDenoiser, assert_same_state, distribution_report, load_pickle, load_state,
    read_stats, run_script, sample_mixture, sigma_column, torchrun)
from training.loss_cdm import CDMLoss
from training.training_loop import EDM2Loss

#----------------------------------------------------------------------------
# A tiny deterministic network with EDM preconditioning and an uncertainty output.

class TinyDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.8))
        self.b = torch.nn.Parameter(torch.tensor(-0.3))
        self.c = torch.nn.Parameter(torch.tensor(0.2))

    def forward(self, x, sigma, class_labels=None, return_logvar=False):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        norm = (sigma ** 2 + 0.25).sqrt()
        denoised = 0.25 / norm ** 2 * x + 0.5 * sigma / norm * torch.tanh(self.a * x / norm + self.b * sigma.log())
        return (denoised, self.c * sigma.log()) if return_logvar else denoised


def direct_term(net, x_t, sigma_t, denoised_t, u, z, num_steps, gap_min, gap_max, sigma_min=0.002, rho=7.0):
    """The CDM term written out per example in float64, from given uniforms u [N] and step noises z[k] [2N, ...]."""
    n = x_t.shape[0]
    rows = []
    for i in range(n):
        t = float(sigma_t[i])
        s = max(t - (gap_min + (gap_max - gap_min) * float(u[i])), min(t, sigma_min))
        levels = [(t ** (1 / rho) + k / num_steps * (s ** (1 / rho) - t ** (1 / rho))) ** rho for k in range(num_steps + 1)]
        levels[0], levels[-1] = t, s
        ends = []
        for chain in range(2):
            x = x_t[i:i + 1].detach().double()
            for k in range(num_steps):
                hi, lo = levels[k], levels[k + 1]
                with torch.no_grad():
                    d = net(x, torch.tensor(hi, dtype=torch.float64))
                x = x + 2 * (lo - hi) * (x - d) / hi + (2 * hi * (hi - lo)) ** 0.5 * z[k][chain * n + i].double()
            ends.append(net(x, torch.tensor(s, dtype=torch.float64)))
        anchor = denoised_t[i:i + 1].double()
        rows.append((ends[0] - anchor) * (ends[1] - anchor))
    return torch.cat(rows)


def images_for_test():
    return torch.linspace(-0.9, 0.9, 3 * 2 * 2 * 2).reshape(3, 2, 2, 2)

#----------------------------------------------------------------------------
# The loss itself.

@pytest.mark.parametrize('weight', [1.0, 3.5])
def test_loss_is_edm2_plus_weighted_term(weight):
    images, num_steps, gap_min, gap_max, seed = images_for_test(), 3, 0.1, 0.5, 7
    P_mean, P_std = -0.4, 1.0
    net = TinyDenoiser()
    loss_fn = CDMLoss(P_mean=P_mean, P_std=P_std, weight=weight, num_steps=num_steps, gap_min=gap_min, gap_max=gap_max,
        report_stats=False)
    torch.manual_seed(seed)
    total = loss_fn(net, images)
    total.sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()

    # The same draws, in the documented order: EDM2Loss's sigma and noise, then u, then one noise per step.
    torch.manual_seed(seed)
    edm2 = EDM2Loss(P_mean=P_mean, P_std=P_std)(net, images)
    u = torch.rand([3, 1, 1, 1])
    z = [torch.randn([6, 2, 2, 2]) for _ in range(num_steps)]
    torch.manual_seed(seed)
    sigma_t = (P_mean + P_std * torch.randn([3, 1, 1, 1])).exp()
    x_t = images + torch.randn_like(images) * sigma_t
    denoised_t = net(x_t, sigma_t)
    term = direct_term(net, x_t, sigma_t.flatten(), denoised_t, u.flatten(), z, num_steps, gap_min, gap_max)
    assert term.abs().max() > 1e-4  # not trivially zero
    expected = edm2.double() + weight * term
    assert total.shape == images.shape and total.dtype == torch.float32
    assert torch.allclose(total.double(), expected, rtol=1e-5, atol=1e-6)
    expected.sum().backward()
    for grad, p in zip(grads, net.parameters()):
        assert torch.allclose(grad.double(), p.grad.double(), rtol=1e-4, atol=1e-6)


def test_weight_zero_is_edm2_with_the_same_draws():
    images, net = images_for_test(), TinyDenoiser()
    torch.manual_seed(11)
    cdm = CDMLoss(P_mean=-0.8, P_std=1.6, weight=0.0)(net, images)
    after_cdm = torch.rand(4)
    torch.manual_seed(11)
    edm2 = EDM2Loss(P_mean=-0.8, P_std=1.6)(net, images)
    assert torch.equal(cdm, edm2)
    assert torch.equal(after_cdm, torch.rand(4))  # nothing extra was drawn


def test_second_noise_level():
    loss_fn = CDMLoss(gap_min=0.05, gap_max=0.05)
    sigma_t = torch.tensor([0.001, 0.002, 0.01, 1.0, 80.0]).reshape(-1, 1, 1, 1)
    sigma_s = loss_fn.draw_sigma_s(sigma_t).flatten()
    assert torch.allclose(sigma_s, torch.tensor([0.001, 0.002, 0.002, 0.95, 79.95]))
    torch.manual_seed(0)
    sigma_t = torch.full([10000, 1, 1, 1], 3.0)
    gap = sigma_t - CDMLoss(gap_min=0.1, gap_max=0.3).draw_sigma_s(sigma_t)
    assert 0.1 - 1e-6 <= gap.min() and gap.max() <= 0.3 + 1e-6 and abs(gap.mean() - 0.2) < 0.003


class MisreadSigma(torch.nn.Module):
    """The exact mixture denoiser evaluated at a wrong noise level: not consistent."""

    def __init__(self, factor):
        super().__init__()
        self.exact, self.factor = MixtureDenoiser(), factor

    def forward(self, x, sigma, class_labels=None):
        return self.exact(x, torch.as_tensor(sigma) * self.factor)


def sampler_drift(net, sigma, gap, num_steps, repeats=20000):
    """Largest |E[D(x_s; s) | x_t] - D(x_t; t)| over three x_t, in standard errors and absolute."""
    torch.manual_seed(0)
    points = torch.tensor([[0.35, 0.3], [-0.3, 0.2], [0.1, -0.5]]).reshape(3, 2, 1, 1)
    loss_fn = CDMLoss(gap_min=gap, gap_max=gap, num_steps=num_steps, report_stats=False)
    x_t = points.repeat_interleave(repeats, 0)
    sigma_t = torch.full([len(x_t), 1, 1, 1], sigma)
    sigma_s = loss_fn.draw_sigma_s(sigma_t)
    x_s = loss_fn.run_sampler(net, x_t, sigma_t, sigma_s, None)
    with torch.no_grad():
        ends = net(x_s, torch.cat([sigma_s, sigma_s])).reshape(2, 3, repeats, 2)
        start = net(points, torch.full([3, 1, 1, 1], sigma)).reshape(3, 2)
    mean, stderr = ends.mean(dim=(0, 2)), ends.std(dim=(0, 2)) / (2 * repeats) ** 0.5
    diff = (mean - start).abs()
    return (diff / stderr).max().item(), diff.max().item()


def test_exact_denoiser_is_consistent_along_its_sampler(single_thread):
    # The true posterior mean is a martingale along the reverse SDE, up to the sampler's discretisation.
    in_stderr, _ = sampler_drift(MixtureDenoiser(), sigma=0.3, gap=0.1, num_steps=20)
    assert in_stderr < 4
    in_stderr, _ = sampler_drift(MisreadSigma(1.2), sigma=0.3, gap=0.1, num_steps=20)
    assert in_stderr > 10
    # Euler-Maruyama converges: a finer sampler drifts less where the posterior changes fast.
    coarse = sampler_drift(MixtureDenoiser(), sigma=0.1, gap=0.05, num_steps=5)[1]
    fine = sampler_drift(MixtureDenoiser(), sigma=0.1, gap=0.05, num_steps=40)[1]
    assert fine < coarse / 3


def test_settings_are_checked_and_kept():
    for kwargs, option in [(dict(weight=-1), 'weight'), (dict(weight=float('nan')), 'weight'),
            (dict(num_steps=0), 'num_steps'), (dict(num_steps=2.5), 'num_steps'), (dict(gap_min=-0.1), 'gap_min'),
            (dict(gap_min=0.2, gap_max=0.1), 'gap_max'), (dict(gap_max=0), 'gap_max'), (dict(sigma_min=0), 'sigma_min'),
            (dict(rho=0), 'rho'), (dict(P_std=0), 'P_std')]:
        with pytest.raises(dnnlib.UserError) as info:
            CDMLoss(**kwargs)
        assert info.value.option == option, kwargs

    loss_fn = CDMLoss(P_mean=-0.8, P_std=1.6, weight=2.0)
    state = loss_fn.state_dict()
    assert state == dict(P_mean=-0.8, P_std=1.6, sigma_data=0.5, weight=2.0, num_steps=5, gap_min=0.0, gap_max=0.05,
        sigma_min=0.002, rho=7.0)
    CDMLoss(P_mean=-0.8, P_std=1.6, weight=2.0).load_state_dict(state)
    with pytest.raises(dnnlib.UserError, match='weight: training state 2.0, now 1.0'):
        CDMLoss(P_mean=-0.8, P_std=1.6, weight=1.0).load_state_dict(state)

    entries = loss_fn.snapshot_entries()
    assert list(entries) == ['loss_fn'] and type(entries['loss_fn']) is EDM2Loss
    assert (entries['loss_fn'].P_mean, entries['loss_fn'].P_std) == (-0.8, 1.6)
    assert pickle.loads(pickle.dumps(loss_fn)).state_dict() == state


def test_command_line_options(data16):
    def config(*args):
        ctx = train_edm2.cmdline.make_context('train_edm2.py', ['--outdir=unused', f'--data={data16}', '--cond=False',
            '--preset=tiny-img16', *args])
        return train_edm2.setup_training_config(**{k: v for k, v in ctx.params.items() if k not in ('outdir', 'dry_run')})

    c = config('--method=cdm', '--duration=2Ki', '--cdm_weight=3', '--cdm_steps=4', '--cdm_gap_max=0.1')
    assert c.loss_kwargs == dict(class_name='training.loss_cdm.CDMLoss', P_mean=-0.8, P_std=1.6, weight=3.0, num_steps=4,
        gap_max=0.1)
    assert train_edm2.METHOD_OPTIONS['P_mean'].methods == ['edm2', 'cdm']
    with pytest.raises(click.BadParameter, match='gap_max') as info:
        config('--method=cdm', '--duration=2Ki', '--cdm_gap_min=0.2', '--cdm_gap_max=0.1')
    assert info.value.param_hint == '--cdm_gap_max'
    with pytest.raises(click.BadParameter) as info:
        config('--cdm_weight=3')
    assert info.value.param_hint == '--cdm_weight' and 'method=cdm' in str(info.value)

#----------------------------------------------------------------------------
# Runs through the command line, on conftest.py's data16.

TRAIN_ARGS = ['--method=cdm', '--cond=False', '--preset=tiny-img16', '--channels=8', '--batch=32', '--status=512',
    '--snapshot=1Ki', '--checkpoint=1Ki', '--seed=3']


@pytest.fixture(scope='module')
def cdm_run(data16, tmp_path_factory):
    outdir = tmp_path_factory.mktemp('cdm') / 'run'
    run_script('train_edm2.py', f'--outdir={outdir}', f'--data={data16}', '--duration=2Ki', *TRAIN_ARGS)
    return outdir


@pytest.mark.slow
def test_run_writes_plain_edm2_snapshots(cdm_run, tmp_path):
    path = cdm_run / 'network-snapshot-0000002-0.100.pkl'
    assert b'loss_cdm' not in path.read_bytes()  # nothing in it needs this project's CDM module
    snapshot = load_pickle(path)
    assert list(snapshot.keys()) == ['encoder', 'dataset_kwargs', 'loss_fn', 'ema']
    assert type(snapshot['loss_fn']).__name__ == 'EDM2Loss' and snapshot['loss_fn'].P_mean == -0.8
    state = load_state(cdm_run / 'training-state-0000002.pt')
    assert state['loss_fn']['weight'] == 10.0 and state['loss_fn']['num_steps'] == 5
    stats = read_stats(cdm_run)
    assert all(torch.isfinite(torch.tensor([row['Loss/loss'], row['CDM/consistency']])).all() for row in stats[1:])
    assert all(0 < row['CDM/sigma_gap'] < 0.05 for row in stats[1:])

    result = run_script('generate_images.py', f'--net={path}', f'--outdir={tmp_path / "out"}', '--seeds=0-3')
    assert sorted(os.listdir(tmp_path / 'out')) == [f'{seed:06d}.png' for seed in range(4)], result.stdout


@pytest.mark.slow
def test_resume_continues_identically(cdm_run, data16, tmp_path):
    outdir = tmp_path / 'run'
    run_script('train_edm2.py', f'--outdir={outdir}', f'--data={data16}', '--duration=1Ki', *TRAIN_ARGS)
    second = run_script('train_edm2.py', f'--outdir={outdir}', f'--data={data16}', '--duration=2Ki', *TRAIN_ARGS)
    assert 'training-state-0000001.pt' in second.stdout
    resumed = load_state(outdir / 'training-state-0000002.pt')
    straight = load_state(cdm_run / 'training-state-0000002.pt')
    assert_same_state(straight, resumed)
    keys = ('Progress/kimg', 'Loss/loss', 'CDM/consistency')
    assert [[row.get(key) for key in keys] for row in read_stats(outdir)] == \
        [[row.get(key) for key in keys] for row in read_stats(cdm_run)]


@pytest.mark.slow
def test_two_processes(data16, tmp_path):
    outdir = tmp_path / 'run'
    result = run_script('train_edm2.py', f'--outdir={outdir}', f'--data={data16}', '--method=cdm', '--cond=False',
        '--preset=tiny-img16', '--channels=8', '--batch=32', '--batch-gpu=8', '--duration=256', '--status=128',
        '--snapshot=0', '--checkpoint=1Ki', launcher=torchrun())
    state = load_state(outdir / 'training-state-0000000.pt')  # saved after the DDP consistency check
    assert state['state']['cur_nimg'] == 256
    assert all(entry['step'].item() == 8 for entry in state['optimizer']['state'].values())
    assert 'Processes:          2 on cpu' in result.stdout
    assert all('CDM/consistency' in row for row in read_stats(outdir)[1:])

#----------------------------------------------------------------------------
# Learning: on the Gaussian mixture of helpers.py (as in test_cd_learning.py), from scratch, CDM is not worse than EDM2.

class MLPWithLogvar(MLPDenoiser):
    """The MLP denoiser plus an uncertainty output log u(sigma) from Fourier features of c_noise."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.logvar_head = torch.nn.Linear(2 * len(self.freqs), 1)
        torch.nn.init.zeros_(self.logvar_head.weight)
        torch.nn.init.zeros_(self.logvar_head.bias)

    def forward(self, x, sigma, class_labels=None, return_logvar=False):
        denoised = super().forward(x, sigma, class_labels)
        if not return_logvar:
            return denoised
        phase = (sigma_column(sigma, x).to(torch.float32).expand(x.shape[0], 1).log() / 4) * self.freqs
        return denoised, self.logvar_head(torch.cat([phase.sin(), phase.cos()], dim=1)).reshape(-1, 1, 1, 1)


def train_from_scratch(loss_fn, seed, steps=1500, batch_size=256, lr=3e-3):
    """Adam with a linear decay over the second half; the global generator is reseeded every step, as the
    training loop does, so both methods see the same EDM2 draws."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = MLPWithLogvar()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, 2 * (1 - step / steps)))
    for step in range(steps):
        torch.manual_seed(seed * 1000003 + step)
        loss = loss_fn(net, sample_mixture(batch_size, generator)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return net.eval()


def learning_experiment(seed, heun_steps=16, num_samples=8000):
    reports = {}
    generator = torch.Generator().manual_seed(100 + seed)
    noise = torch.randn(num_samples, 2, 1, 1, generator=generator)
    truth = sample_mixture(num_samples, generator).flatten(1)
    for name, loss_fn in [('edm2', EDM2Loss(P_mean=-0.8, P_std=1.6)),
            ('cdm', CDMLoss(P_mean=-0.8, P_std=1.6, report_stats=False))]:
        net = train_from_scratch(loss_fn, seed)
        with torch.no_grad():
            reports[name] = distribution_report(edm_sampler(net, noise, num_steps=heun_steps).flatten(1), truth)
    reports['reference'] = distribution_report(sample_mixture(num_samples, generator).flatten(1), truth)
    return reports


@pytest.mark.slow
def test_cdm_is_not_worse_than_edm2(single_thread):
    results = [learning_experiment(seed) for seed in (0, 1)]
    for reports in results:
        print({name: {key: round(value, 4) for key, value in report.items()} for name, report in reports.items()})
        assert reports['edm2']['on_mode'] > 0.85 and reports['cdm']['on_mode'] > 0.85  # both learned the modes
    plain = sum(reports['edm2']['sliced_w1'] for reports in results)
    cdm = sum(reports['cdm']['sliced_w1'] for reports in results)
    print(f'sliced W1 summed over seeds: edm2 {plain:.4f}, cdm {cdm:.4f} ({cdm / plain:.3f}x)')
    assert cdm <= 1.1 * plain
    for reports in results:
        assert reports['cdm']['sliced_w1'] <= 1.25 * reports['edm2']['sliced_w1']

#----------------------------------------------------------------------------
