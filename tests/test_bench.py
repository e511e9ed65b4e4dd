"""Smoke tests of bench/bench_cd.py: it runs end to end on CPU and its measurements see what they claim to."""

import ast
import math
import os
import re

import pytest
import torch

from bench import bench_cd
from helpers import printed_value, run_script
from torch_utils import misc
from training import loss_cd

SMALLEST = ['--net-size=tiny', '--batch=2', '--S=2', '--T=4', '--reps=1', '--warmup=0']


def run_bench(*args, check=True):
    return run_script(os.path.join('bench', 'bench_cd.py'), *args, check=check)


@pytest.mark.slow
def test_bench_prints_ratios_breakdown_and_memory():
    out = run_bench(*SMALLEST).stdout
    for label in ('CD step / plain step', 'sampler / S raw evaluations', 'peak step memory CD / plain'):
        ratio = printed_value(out, label)
        assert math.isfinite(ratio) and ratio > 0, (label, ratio)
    for part in ('teacher Heun hop', 'student forward', 'student backward', 'target pass', 'edges, checks',
            'gradient sanitising', 'other'):
        assert re.search(rf'^\s+{part}.*\s-?\d+\.\d\d\s', out, re.MULTILINE), f'no breakdown row {part!r} in:\n{out}'
    assert 'on cpu' in out and 'S=2, T=4' in out
    assert 'teacher solver heun (2 teacher evaluations per non-terminal row)' in out
    assert 'named ranges of the real loss in 1 profiled CD steps' in out
    assert 'host syncs per step: plain 0, CD 0 (CPU: reads of tensor values in the loss and backward' in out
    assert 'mixed precision off, cuDNN autotuning off' in out
    assert re.search(r'^batch sizes of the no-grad passes over the reps: teacher hop 1 distinct \([12]-[12]\), '
        r'target pass 1 distinct \([0-2]-[0-2]\)$', out, re.MULTILINE), out
    peaks = re.search(r'^step peak above resident.*?(\d+\.\d)\s+(\d+\.\d)$', out, re.MULTILINE)
    assert peaks and float(peaks.group(1)) > 0 and float(peaks.group(2)) > 0, out


@pytest.mark.slow
def test_bench_times_the_ddim_teacher():
    out = run_bench(*SMALLEST, '--teacher_solver=ddim').stdout
    assert 'teacher solver ddim (1 teacher evaluation per non-terminal row)' in out
    assert re.search(r'^\s+teacher DDIM hop \(1 eval, non-terminal rows\)\s+\d+\.\d\d\s', out, re.MULTILINE), out
    ratio = printed_value(out, 'CD step / plain step')
    assert math.isfinite(ratio) and ratio > 0
    # The floor counts one teacher evaluation per non-terminal row: 1 + (1 * non-terminal + target rows) / 3 per sample.
    floor = float(re.search(r'network-evaluation floor for these edges (\d+\.\d+)', out).group(1))
    assert 1 <= floor <= 1 + 2 / 3 + 1e-9


@pytest.mark.slow
def test_bench_times_a_guided_teacher():
    out = run_bench(*SMALLEST, '--guidance=2').stdout
    assert ('guided teacher, guidance 2: guide tiny (723,691 parameters), 2 guide evaluations per non-terminal row '
        "besides the teacher's") in out
    assert re.search(r'^\s+guided teacher Heun hop \(2\+2 evals, non-terminal rows\)\s+\d+\.\d\d\s', out, re.MULTILINE), out
    assert re.search(r'^resident: weights \(\+ teacher, guide\) and Adam state\s', out, re.MULTILINE), out
    # A guide of the student's size counts like the teacher: (3 * batch + 4 * non-terminal + general rows) / (3 * batch).
    floor = float(re.search(r'network-evaluation floor for these edges (\d+\.\d+)\)', out).group(1))
    counts = {name: float(value) for name, value in re.findall(r'(terminal|general) (\d+\.\d+)', out)}
    assert floor == pytest.approx((6 + 4 * (2 - counts['terminal']) + counts['general']) / 6, abs=1e-3)


def test_guided_setup(single_thread):
    kwargs = dict(batch=3, S=2, T=4, dropout=0.0, fp16=False, device=torch.device('cpu'), seed=1)
    guided = bench_cd.build_setup('tiny', guidance=2.0, guide_size='small', **kwargs)
    plain = bench_cd.build_setup('tiny', **kwargs)
    # The guide has the architecture of its size and the teacher's interface; the rest is the unguided setup.
    small = bench_cd.NET_SIZES['small']
    assert (guided.guide.img_resolution, guided.guide.label_dim) == (16, 10)
    assert guided.guide.init_kwargs.model_channels == small['model_channels']
    assert guided.guide.init_kwargs.channel_mult == small['channel_mult']
    assert not guided.guide.training and not any(param.requires_grad for param in guided.guide.parameters())
    assert plain.guide is None and plain.cd_loss.guidance == 1 and guided.cd_loss.guide_net is guided.guide
    assert torch.equal(guided.images, plain.images) and torch.equal(guided.labels, plain.labels)
    for a, b in zip(guided.teacher.parameters(), plain.teacher.parameters()):
        assert torch.equal(a, b)
    # The timed loss evaluates the guide.
    calls = []
    guided.guide.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    bench_cd.cd_step(guided, seed=3, cur_nimg=0)
    assert len(calls) == 2 and calls[0] == 3 - guided.cd_loss.edge_counts.terminal


def test_bench_rejects_a_guide_size_without_guidance():
    result = run_bench('--guide-size=tiny', check=False)
    assert result.returncode != 0 and '--guide-size' in result.stderr and 'give --guidance too' in result.stderr


def test_bench_rejects_fewer_teacher_edges_than_student_steps():
    result = run_bench('--S=8', '--T=4', check=False)
    assert result.returncode != 0
    assert '--T' in result.stderr and 'T >= S = 8' in result.stderr


def all_classes_setup(seed=1, teacher_solver='heun', dropout=0.0):
    """A bench setup whose CD loss also runs the terminal teacher evaluation, and a step (cur_nimg)
    whose batch holds all three edge classes, so that every range of the loss is entered."""
    setup = bench_cd.build_setup('tiny', batch=6, S=2, T=4, dropout=dropout, fp16=False, device=torch.device('cpu'), seed=seed,
        teacher_solver=teacher_solver)
    assert setup.cd_loss.teacher_solver == teacher_solver
    setup.cd_loss = loss_cd.EDMConsistencyDistillLoss(setup.teacher, S=2, T_start=4, T_end=4, T_anneal_kimg=0,
        sampling_mode='uniform', terminal_teacher_hop=True, teacher_solver=teacher_solver)
    for cur_nimg in range(0, 6 * 50, 6):
        misc.set_random_seed(3, 0, cur_nimg)
        edges, _ = setup.cd_loss.draw_edges(setup.images, setup.cd_loss.grids(4))
        terminal, snap = edges['is_terminal'], edges['is_boundary_snap']
        if terminal.any() and snap.any() and (~terminal & ~snap).any():
            return setup, cur_nimg
    raise AssertionError('no step with all three edge classes')


@pytest.mark.parametrize('teacher_solver', ['heun', 'ddim', 'addim'])
def test_breakdown_ranges_are_those_of_the_loss(single_thread, teacher_solver):
    setup, cur_nimg = all_classes_setup(teacher_solver=teacher_solver)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        misc.set_random_seed(3, 0, cur_nimg)
        setup.cd_loss(net=setup.student, images=setup.images, labels=setup.labels)
    in_loss = {event.name for event in prof.events() if event.name.startswith('cd/')}
    expected = {name for names in bench_cd.BREAKDOWN_RANGES.values() for name in names if name.startswith('cd/')}
    # Every range the breakdown sums is entered by one real loss call, and the loss has no range the
    # breakdown does not know (it would silently end up in "other").
    assert expected <= in_loss, f'ranges missing from the loss: {sorted(expected - in_loss)}'
    assert in_loss <= expected, f'loss ranges unknown to the bench: {sorted(in_loss - expected)}'


def test_breakdown_of_a_profiled_cd_step(single_thread):
    setup, cur_nimg = all_classes_setup()
    bench_cd.cd_step(setup, seed=3, cur_nimg=cur_nimg)
    events, seconds = bench_cd.profiled_step(setup, bench_cd.cd_step, seed=3, cur_nimg=cur_nimg)
    names = {event.name for event in events}
    assert {'bench/optimizer'} <= names and any(name.startswith(bench_cd.BACKWARD_PREFIX) for name in names)
    parts = bench_cd.part_seconds(events, setup.device)
    assert all(value > 0 for value in parts.values()), parts
    assert sum(parts.values()) <= seconds


def test_profiled_loss_has_the_values_of_the_unprofiled_one(single_thread):
    setup, cur_nimg = all_classes_setup()
    def loss_value():
        misc.set_random_seed(3, 0, cur_nimg)
        with torch.no_grad():
            return setup.cd_loss(net=setup.student, images=setup.images, labels=setup.labels)
    plain = loss_value()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        profiled = loss_value()
    assert torch.equal(plain, profiled)


def test_time_training_profiles_the_timed_steps(single_thread):
    setup = bench_cd.build_setup('tiny', batch=3, S=2, T=4, dropout=0.0, fp16=False, device=torch.device('cpu'), seed=1)
    samples = bench_cd.time_training(setup, seed=3, warmup=1, reps=2)
    assert len(samples.plain) == len(samples.cd) == len(samples.counts) == 2
    assert len(samples.profiled.cd) == len(samples.profiled.plain) == len(samples.profiled.parts) == 2
    assert all(sum(counts.values()) == 3 for counts in samples.counts)
    assert bench_cd.host_syncs(setup, seed=3, cur_nimg=0) == dict(plain=0, cd=0)


class ReadInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        float(grad.sum())  # a host read in the backward pass
        return 2 * grad


def test_host_read_counter_sees_value_reads_in_forward_and_backward(single_thread):
    x = torch.linspace(-1, 1, 5, requires_grad=True)
    counter = bench_cd.HostReadCounter()
    with counter:
        y = ReadInBackward.apply(x * 3).sum()
        _ = x[torch.tensor([0, 2])] + x.argsort()[:2]  # integer indices and sorting read nothing on the host
        assert counter.count == 0
        _ = x[x > 0]
        assert counter.count == 1
        _ = int(y) + len(torch.nonzero(x))
        assert counter.count == 3
        y.backward()
    assert counter.count == 4


def test_cd_loss_step_reads_no_tensor_values_on_the_host(single_thread):
    """Every edge class, the terminal teacher evaluation, the synchronised-dropout and the general-row
    target passes, with one of each teacher solver: no step of the loss or its backward pass waits for
    the device's values (the edge counts come over in one copy, which the CPU cannot show)."""
    for teacher_solver, dropout in (('heun', 0.0), ('ddim', 0.1), ('addim', 0.0)):
        setup, cur_nimg = all_classes_setup(teacher_solver=teacher_solver, dropout=dropout)
        assert loss_cd._has_active_dropout(setup.student) == (dropout > 0)
        counter = bench_cd.HostReadCounter()
        bench_cd.cd_step(setup, 3, cur_nimg, host_reads=counter)
        assert counter.count == 0, teacher_solver
        assert all(param.grad is not None for param in setup.student.parameters() if param.requires_grad)


def test_bench_has_no_copy_of_the_loss_math(repo_root):
    """The bench times the loss as training runs it; it must not rebuild any part of the CD step itself."""
    with open(os.path.join(repo_root, 'bench', 'bench_cd.py')) as f:
        tree = ast.parse(f.read())
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            used.add(node.id)
        elif isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            used.update(alias.asname or alias.name for alias in node.names)
    loss_math = {'consistency_ops', 'heun_hop_edm', 'ddim_step_edm', 'inv_ddim_edm', 'edge_targets', 'loss_weight',
        'consistency_distance', 'synchronised_student_pass', 'device_rng_state', 'draw_edges', 'loss_from_edges',
        'ode_hop', '_classify_rows', '_general_student_pass', 'sample_segment_and_teacher_pair'}
    assert not used & loss_math, sorted(used & loss_math)


def test_raw_evaluations_replay_the_sampler_inputs(single_thread):
    setup = bench_cd.build_setup('tiny', batch=3, S=3, T=4, dropout=0.0, fp16=False, device=torch.device('cpu'), seed=2)
    net, loss = setup.student.eval(), setup.cd_loss
    grid = dict(sigma_min=loss.sigma_min, sigma_max=loss.sigma_max, rho=loss.rho)
    noise = torch.randn_like(setup.images)
    with torch.no_grad():
        inputs = bench_cd.sampler_inputs(net, noise, setup.labels, 3, grid)
        sample = bench_cd.generate_images.consistency_sampler(net, noise, setup.labels, num_steps=3, **grid)
        assert [float(sigma) for _, sigma in inputs] == pytest.approx(loss.student_sigmas()[:3].tolist())
        assert torch.allclose(inputs[0][0], noise * loss.sigma_max)
        assert not torch.equal(inputs[1][0], inputs[0][0])
        # The sampler returns the prediction at its last input.
        assert torch.equal(net(*inputs[-1], setup.labels), sample)


@pytest.mark.skipif(not os.path.exists('/proc/self/clear_refs'), reason='needs Linux /proc')
def test_rss_step_peak_sees_a_temporary_buffer():
    size = 64 << 20

    def allocate_and_free(setup, seed, cur_nimg):
        torch.ones(size, dtype=torch.uint8).sum()

    def nothing(setup, seed, cur_nimg):
        pass

    assert bench_cd.rss_step_peak(None, allocate_and_free, 0, 0) >= 0.9 * size
    assert bench_cd.rss_step_peak(None, nothing, 0, 0) < 0.5 * size
