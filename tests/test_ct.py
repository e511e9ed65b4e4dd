"""Multistep consistency training (--method=ct): its targets, the command line, resume, DDP, and learning
on the exact Gaussian-mixture problem."""

import json
import os

import pytest
import torch

import dnnlib
from generate_images import consistency_sampler
from helpers import (MLPDenoiser, MixtureDenoiser, RHO, SIGMA_MAX, SIGMA_MIN, assert_same_state, distil,
    distribution_report, fit_to_teacher, load_pickle, load_state, run_script, sample_mixture, torchrun)
from training.loss_cd import EDMConsistencyDistillLoss
from training.loss_ct import ConsistencyTrainingLoss

#----------------------------------------------------------------------------
# The target, against a direct computation.

class LinearStudent(torch.nn.Module):
    """D(x; sigma) = a(sigma) x with a smooth, known a(sigma)."""

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return x / (1 + sigma ** 2)


def test_ct_target_is_the_data_hop_followed_by_the_student_step():
    torch.manual_seed(0)
    loss_fn = ConsistencyTrainingLoss(S=3, T_start=12, T_end=12, loss_type='l2', weight_mode='flat', report_stats=False)
    images = torch.randn([256, 2, 1, 1]) * 0.5
    edges, noise = loss_fn.draw_edges(images, loss_fn.grids(12))
    student = LinearStudent()
    loss = loss_fn.loss_from_edges(student, images, None, edges, noise)

    y, eps = images.double(), noise.double()
    sigma_t, sigma_s, sigma_bdry = (edges[name].double().reshape(-1, 1, 1, 1) for name in ('sigma_t', 'sigma_s', 'sigma_bdry'))
    terminal = edges['is_terminal'].reshape(-1, 1, 1, 1)
    snap = edges['is_boundary_snap'].reshape(-1, 1, 1, 1)
    x_t = y + sigma_t * eps
    x_s = y + sigma_s * eps                                    # the data's estimate of the ODE hop
    pushed = student(x_s, sigma_s)                              # the student's no-grad DDIM step to the boundary
    x_general = pushed + sigma_bdry / sigma_s * (x_s - pushed)
    x_ref = torch.where(terminal, y, torch.where(snap, y + sigma_bdry * eps, x_general))
    sigma_ref = torch.where(terminal, torch.zeros_like(sigma_t), sigma_bdry)
    target = (x_ref - sigma_ref / sigma_t * x_t) / (1 - sigma_ref / sigma_t)  # the one step from x_t that lands at x_ref
    expected = (student(x_t.float(), sigma_t.float()).double() - target) ** 2
    assert edges['is_terminal'].any() and edges['is_boundary_snap'].any() and (~(edges['is_terminal'] | edges['is_boundary_snap'])).any()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)


def test_ct_reuses_cd_for_everything_but_the_hop():
    torch.manual_seed(1)
    images = torch.randn([64, 2, 1, 1]) * 0.5
    ct = ConsistencyTrainingLoss(S=2, T_start=8, T_end=8, report_stats=False)
    edges, noise = ct.draw_edges(images, ct.grids(8))
    cd = EDMConsistencyDistillLoss(None, S=2, T_start=8, T_end=8, report_stats=False)
    cd.ode_hop = ct.ode_hop  # the one difference between the two methods
    student = LinearStudent()
    assert torch.equal(ct.loss_from_edges(student, images, None, edges, noise),
        cd.loss_from_edges(student, images, None, edges, noise))
    assert ct.hyperparameters() == cd.hyperparameters()


@pytest.mark.parametrize('kwargs, option', [(dict(teacher_pkl='x.pkl'), 'teacher_pkl'),
    (dict(terminal_teacher_hop=True), 'terminal_teacher_hop'), (dict(S=4, T_start=2), 'T_start'),
    (dict(teacher_solver='ddim'), 'teacher_solver'), (dict(teacher_solver='addim', addim_eta=0.5), 'teacher_solver'),
    (dict(addim_eta=0.75), 'addim_eta')])
def test_ct_refuses_settings_it_cannot_use(kwargs, option):
    with pytest.raises(dnnlib.UserError) as info:
        ConsistencyTrainingLoss(**kwargs)
    assert info.value.option == option


def test_ct_has_no_teacher_options():
    assert not {'teacher', 'terminal_teacher_hop', 'teacher_solver', 'addim_eta'} & set(ConsistencyTrainingLoss.OPTIONS)
    assert ConsistencyTrainingLoss(teacher_solver='heun', terminal_teacher_hop=False).teacher_solver == 'heun'  # the defaults pass

#----------------------------------------------------------------------------
# The command line, on conftest.py's data16 and, as the network to start from, its teacher16.

@pytest.fixture(scope='module')
def ct_workdir(tmp_path_factory, data16):
    return tmp_path_factory.mktemp('ct'), data16


CT_ARGS = ['--method=ct', '--preset=tiny-img16', '--cond=False', '--channels=8', '--S=2', '--T_start=4', '--T_end=8',
    '--T_anneal_kimg=1', '--batch=32', '--status=512', '--snapshot=1Ki', '--checkpoint=1Ki']


@pytest.mark.slow
def test_ct_from_scratch_samples_in_S_steps_and_resumes_identically(ct_workdir):
    root, data = ct_workdir
    straight, resumed = root / 'straight', root / 'resumed'
    for outdir, duration in [(straight, '2Ki'), (resumed, '1Ki'), (resumed, '2Ki')]:
        run_script('train_edm2.py', f'--outdir={outdir}', f'--data={data}', f'--duration={duration}', *CT_ARGS)
    a = load_state(straight / 'training-state-0000002.pt')
    b = load_state(resumed / 'training-state-0000002.pt')
    assert_same_state(a, b, parts=('net', 'loss_fn'))

    snapshot = straight / 'network-snapshot-0000002-0.100.pkl'
    data_pkl = load_pickle(snapshot)
    assert data_pkl['cd']['method'] == 'ct' and data_pkl['cd']['S'] == 2 and data_pkl['cd']['init'] is None
    run_script('generate_images.py', f'--net={snapshot}', f'--outdir={root / "out"}', '--seeds=0-3')
    assert len(os.listdir(root / 'out')) == 4


@pytest.mark.slow
def test_ct_from_init_starts_from_its_weights(ct_workdir, teacher16):
    root, data = ct_workdir
    outdir = root / 'tuned'
    args = [f'--outdir={outdir}', f'--data={data}', f'--init={teacher16}', '--duration=64', *CT_ARGS]
    run_script('train_edm2.py', *[arg for arg in args if arg != '--channels=8'])
    start = load_pickle(outdir / 'network-snapshot-0000000-0.100.pkl')['ema']
    init = load_pickle(teacher16)['ema']
    with torch.no_grad():  # a training-mode pass normalises EDM2's weights in place, as the run's first pass does
        init.train()(torch.zeros([1, 3, 16, 16]), torch.ones([1]))
    for (name, a), (_, b) in zip(start.state_dict().items(), init.state_dict().items()):
        assert torch.equal(a, b.to(a.dtype)), name
    options = json.load(open(outdir / 'training_options.json'))
    assert len(options['loss_kwargs']['init_sha256']) == 64

    refused = run_script('train_edm2.py', *args, check=False)  # --channels cannot change the starting network
    assert refused.returncode == 2 and 'architecture of its pretrained network' in refused.stderr
    refused = run_script('train_edm2.py', f'--outdir={root / "bad"}', f'--data={data}', '--duration=64',
        f'--teacher={teacher16}', *CT_ARGS, check=False)
    assert refused.returncode == 2 and '--teacher is an option of --method=cd' in refused.stderr


@pytest.mark.slow
def test_ct_ddp_two_processes(ct_workdir):
    root, data = ct_workdir
    # The loop checks after each checkpoint that the ranks' weights agree.
    run_script('train_edm2.py', f'--outdir={root / "ddp"}', f'--data={data}', '--duration=1Ki', *CT_ARGS, launcher=torchrun())
    assert (root / 'ddp' / 'training-state-0000001.pt').is_file()

#----------------------------------------------------------------------------
# Learning: CT from an imperfect start, without the teacher, beats the start's own S-step sampling.

@pytest.mark.slow
@pytest.mark.parametrize('seed', [0, 1])
def test_ct_student_beats_its_start(seed, single_thread):
    S, batch_size = 2, 256
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    student = MLPDenoiser()
    fit_to_teacher(student, MixtureDenoiser().eval(), 300, batch_size, lr=1e-3, generator=generator)  # imperfect start
    noise = torch.randn(4000, 2, 1, 1, generator=generator)
    truth = sample_mixture(4000, generator).flatten(1)
    def sliced_w1(net):
        with torch.no_grad():
            points = consistency_sampler(net.eval(), noise, num_steps=S, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO)
        return distribution_report(points.flatten(1), truth)['sliced_w1']

    before = sliced_w1(student)
    loss_fn = ConsistencyTrainingLoss(S=S, T_start=2 * S, T_end=16, T_anneal_kimg=50, sigma_min=SIGMA_MIN,
        sigma_max=SIGMA_MAX, rho=RHO, report_stats=False)
    distil(student.train(), loss_fn, 500, batch_size, lr=1e-3, generator=generator)  # data only, no teacher
    after = sliced_w1(student)
    # Seeds 0-2 gave after/before 0.31, 0.35, 0.41 (before: 0.36-0.38; the exact teacher's 2-step Euler: 0.41).
    assert after < 0.6 * before, (before, after)
