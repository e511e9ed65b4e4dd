"""Smoke tests of bench/bench_cd.py: it runs end to end on CPU and its measurements see what they claim to."""

import math
import os
import re
import subprocess
import sys

import pytest
import torch

from bench import bench_cd

SMALLEST = ['--net-size=tiny', '--batch=2', '--S=2', '--T=4', '--reps=1', '--warmup=0']


def run_bench(repo_root, env, *args):
    return subprocess.run([sys.executable, os.path.join('bench', 'bench_cd.py'), *args], cwd=repo_root, env=env,
        capture_output=True, text=True, timeout=300)


def printed_ratio(output, label):
    found = re.search(rf'^{re.escape(label)}\s*=\s*(\S+)', output, re.MULTILINE)
    assert found, f'no line "{label} = ..." in:\n{output}'
    return float(found.group(1))


@pytest.mark.slow
def test_bench_prints_ratios_breakdown_and_memory(repo_root, subprocess_env):
    result = run_bench(repo_root, subprocess_env, *SMALLEST)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for label in ('CD step / plain step', 'sampler / S raw evaluations', 'peak step memory CD / plain'):
        ratio = printed_ratio(out, label)
        assert math.isfinite(ratio) and ratio > 0, (label, ratio)
    for part in ('teacher Heun hop', 'student forward', 'student backward', 'target pass', 'gradient sanitising', 'other'):
        assert re.search(rf'^\s+{part}.*\s-?\d+\.\d\d\s', out, re.MULTILINE), f'no breakdown row {part!r} in:\n{out}'
    assert 'on cpu' in out and 'S=2, T=4' in out
    peaks = re.search(r'^step peak above resident.*?(\d+\.\d)\s+(\d+\.\d)$', out, re.MULTILINE)
    assert peaks and float(peaks.group(1)) > 0 and float(peaks.group(2)) > 0, out


def test_bench_rejects_fewer_teacher_edges_than_student_steps(repo_root, subprocess_env):
    result = run_bench(repo_root, subprocess_env, '--S=8', '--T=4')
    assert result.returncode != 0
    assert '--T' in result.stderr and 'T >= S = 8' in result.stderr


def test_breakdown_draws_the_edges_of_the_loss(single_thread):
    setup = bench_cd.build_setup('tiny', batch=6, S=2, T=4, dropout=0.0, fp16=False, device=torch.device('cpu'), seed=1)
    for cur_nimg in (0, 6):
        before = dict(setup.cd_loss.edge_counts)
        bench_cd.cd_step(setup, seed=3, cur_nimg=cur_nimg)
        seconds, counts = bench_cd.cd_step_parts(setup, seed=3, cur_nimg=cur_nimg)
        bench_cd.check_same_edges(setup, before, counts)
        assert sum(counts.values()) == 6
        assert all(seconds[part] > 0 for part in ('forward', 'backward', 'optimizer'))
    # A breakdown drawn at another step than the loss is caught.
    before = dict(setup.cd_loss.edge_counts)
    bench_cd.cd_step(setup, seed=3, cur_nimg=18)
    mismatches = 0
    for other_nimg in (24, 30, 36):
        _, counts = bench_cd.cd_step_parts(setup, seed=3, cur_nimg=other_nimg)
        try:
            bench_cd.check_same_edges(setup, before, counts)
        except RuntimeError:
            mismatches += 1
    assert mismatches > 0


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
