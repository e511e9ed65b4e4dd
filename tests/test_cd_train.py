"""Consistency distillation through the command lines: train_edm2.py --teacher, resume, DDP, sampling."""

import json
import math
import os
import shutil
import socket
import subprocess

import pytest
import torch

from helpers import (REPO_ROOT, TEACHER_ARCH, assert_same_state, load_pickle, load_state, make_digits_zip, make_teacher, network_pickle, read_stats,
    run_script, save_pickle, script_command, script_env, torchrun)
from torch_utils import misc
from training import consistency_ops, pretrained
from training.encoders import StandardRGBEncoder
from training.loss_cd import EDMConsistencyDistillLoss
from training.networks_edm2 import Precond


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """128 labelled digits (d16.zip), a conditional teacher for them (teacher.pkl), and room for the runs."""
    root = tmp_path_factory.mktemp('cd')
    make_digits_zip(root / 'd16.zip', max_images=128)
    make_teacher(root / 'teacher.pkl')
    return root


def train(workdir, outdir, *extra, teacher=None, check=True):
    teacher = workdir / 'teacher.pkl' if teacher is None else teacher
    return run_script('train_edm2.py', f'--outdir={outdir}', f'--data={workdir / "d16.zip"}', '--preset=cd-tiny-img16',
        f'--teacher={teacher}', '--batch=16', '--status=256', '--snapshot=1024', '--checkpoint=1024', *extra, check=check)


def modules_in(obj, seen=None):
    """Every torch module reachable from a nested pickle payload."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        return [obj]
    if isinstance(obj, dict):
        return [m for v in obj.values() for m in modules_in(v, seen)]
    if isinstance(obj, (list, tuple)):
        return [m for v in obj for m in modules_in(v, seen)]
    return modules_in(vars(obj), seen) if hasattr(obj, '__dict__') else []

#----------------------------------------------------------------------------

@pytest.mark.slow
def test_distil_then_sample(workdir):
    root = workdir
    run = root / 'run'
    train(workdir, run, '--duration=1024')
    stats = read_stats(run)
    losses = [s['Loss/loss'] for s in stats if 'Loss/loss' in s]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)

    snapshot = run / 'network-snapshot-0000001-0.100.pkl'
    data = load_pickle(snapshot)
    assert set(data.keys()) == {'ema', 'encoder', 'dataset_kwargs', 'cd'}
    assert data['cd']['S'] == 4 and len(data['cd']['student_sigmas']) == 5
    assert len([m for m in modules_in(data) if hasattr(m, 'sigma_data')]) == 1  # the student EMA, no teacher
    assert b'loss_cd' not in open(snapshot, 'rb').read()
    state = load_state(run / 'training-state-0000001.pt')
    assert 'teacher_net' not in state['loss_fn'] and not modules_in(state['loss_fn'])

    outdir = root / 'images'
    run_script('generate_images.py', f'--net={snapshot}', f'--outdir={outdir}', '--seeds=0-3', f'--grid={root / "grid.png"}')
    assert sorted(os.listdir(outdir)) == [f'{seed:06d}.png' for seed in range(4)]
    assert (root / 'grid.png').is_file()


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(workdir):
    root = workdir
    train(workdir, root / 'straight', '--duration=2048')
    train(workdir, root / 'resumed', '--duration=1024')
    train(workdir, root / 'resumed', '--duration=2048')
    a = load_state(root / 'straight' / 'training-state-0000002.pt')
    b = load_state(root / 'resumed' / 'training-state-0000002.pt')
    assert a['state']['cur_nimg'] == b['state']['cur_nimg'] == 2048
    assert_same_state(a, b, parts=('net', 'loss_fn', 'ema'))

    # The teacher is re-read on resume; without it the run stops with a message naming the path.
    moved = shutil.copy(root / 'teacher.pkl', root / 'teacher-moved.pkl')
    result = train(workdir, root / 'resumed', '--duration=3072', teacher=root / 'gone.pkl', check=False)
    assert result.returncode != 0 and 'gone.pkl does not exist' in result.stdout + result.stderr
    os.remove(moved)


@pytest.mark.slow
def test_resume_refuses_changed_cd_settings(workdir):
    root = workdir
    train(workdir, root / 'changed', '--duration=1024')
    result = train(workdir, root / 'changed', '--duration=2048', '--S=2', check=False)
    assert result.returncode != 0 and 'loss_kwargs.S: run 4, now 2' in result.stdout + result.stderr


@pytest.mark.slow
def test_init_starts_the_student_from_another_network(workdir):
    root = workdir
    make_teacher(root / 'init.pkl', seed=1)
    train(workdir, root / 'warm', '--duration=256', f'--init={root / "init.pkl"}')
    start = load_pickle(root / 'warm' / 'network-snapshot-0000000-0.100.pkl')
    init, teacher = load_pickle(root / 'init.pkl')['ema'], load_pickle(root / 'teacher.pkl')['ema']
    with torch.no_grad():  # a training-mode pass normalises EDM2's weights in place, as the run's first pass does
        for net in (init, teacher):
            net.train()(torch.zeros([1, 3, 16, 16]), torch.ones([1]), torch.zeros([1, 10]))
    weights = [(name, a, init.state_dict()[name], teacher.state_dict()[name]) for name, a in start['ema'].state_dict().items()]
    assert all(torch.equal(a, b.to(a.dtype)) for _, a, b, _ in weights)
    assert not all(torch.equal(a, c.to(a.dtype)) for _, a, _, c in weights)
    assert start['cd']['init'] == str(root / 'init.pkl') and start['cd']['teacher'] == str(root / 'teacher.pkl')
    options = json.load(open(root / 'warm' / 'training_options.json'))
    assert options['loss_kwargs']['init_sha256'] == pretrained.load(str(root / 'init.pkl')).sha256

    make_teacher(root / 'init8.pkl', resolution=8)
    result = train(workdir, root / 'bad-init', '--duration=256', f'--init={root / "init8.pkl"}', check=False)
    assert result.returncode != 0 and '--init' in result.stderr and 'resolution: starting network 8, data 16' in result.stderr
    assert not (root / 'bad-init').exists()


@pytest.mark.slow
def test_mismatched_teacher_is_refused(workdir):
    root = workdir
    make_teacher(root / 'teacher8.pkl', resolution=8)
    result = train(workdir, root / 'bad', '--duration=1024', teacher=root / 'teacher8.pkl', check=False)
    assert result.returncode != 0 and 'resolution: teacher 8, data 16' in result.stdout + result.stderr
    assert not (root / 'bad').exists()  # refused before the run directory is made


def test_check_teacher_reports_each_mismatch():
    teacher = Precond(16, 3, label_dim=10, **TEACHER_ARCH)
    pretrained.check_against_data(teacher, StandardRGBEncoder(), StandardRGBEncoder(), (1, 3, 16, 16), 10)
    with pytest.raises(pretrained.PretrainedError) as err:
        pretrained.check_against_data(teacher, StandardRGBEncoder(), StandardRGBEncoder(), (1, 4, 8, 8), 0)
    for fragment in ['resolution: teacher 16, data 8', 'channels: teacher 3', 'label dimension: teacher 10, data 0']:
        assert fragment in str(err.value)


def test_loaded_networks_are_rebuilt_as_our_precond(tmp_path):
    # A pickle's networks come from the source embedded in it; loading rebuilds them from this repository's
    # Precond when weights and outputs agree, so that the frozen-network shortcuts apply to them.
    torch.manual_seed(3)
    teacher = Precond(16, 3, label_dim=10, **TEACHER_ARCH)
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_()  # non-zero gains, so that every layer shapes the output
    path = save_pickle(network_pickle(teacher.eval()), tmp_path / 'teacher.pkl')
    embedded = load_pickle(path)['ema'].eval()
    assert not isinstance(embedded, Precond)
    loaded = pretrained.load(str(path)).net
    assert type(loaded) is Precond and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    x, sigma, labels = torch.randn([3, 3, 16, 16]), torch.tensor([0.01, 1.0, 60.0]), torch.eye(10)[[1, 4, 9]]
    with torch.no_grad():
        assert torch.allclose(loaded(x, sigma, labels), embedded(x, sigma, labels), rtol=1e-6, atol=1e-6)
    # A network that the rebuilt one does not reproduce is kept as it is.
    with torch.no_grad():
        embedded.unet.out_gain.fill_(float('nan'))
    assert pretrained.rebuilt_as_precond(embedded) is embedded
    assert pretrained.rebuilt_as_precond(loaded) is loaded


def test_student_seeding_is_exact_or_refused():
    torch.manual_seed(1)
    teacher = Precond(16, 3, label_dim=10, **TEACHER_ARCH)
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_()
    student = Precond(16, 3, label_dim=10, **TEACHER_ARCH)
    pretrained.copy_weights(student, teacher)
    for (name, a), (_, b) in zip(misc.named_params_and_buffers(teacher), misc.named_params_and_buffers(student)):
        assert torch.equal(a, b), name

    other = Precond(16, 3, label_dim=10, **dict(TEACHER_ARCH, model_channels=24))
    before = [t.clone() for t in other.parameters()]
    with pytest.raises(pretrained.PretrainedError, match='shape mismatches'):
        pretrained.copy_weights(other, teacher)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))


def test_dry_run_prints_cd_configuration(workdir):
    root = workdir
    result = train(workdir, root / 'dry', '--dry-run', '--S=2', '--T_start=4', '--T_end=8')
    config = json.loads(result.stdout.split('Training config:')[1].split('\n\n')[0])
    assert config['loss_kwargs']['class_name'] == 'training.loss_cd.EDMConsistencyDistillLoss'
    assert (config['loss_kwargs']['S'], config['loss_kwargs']['T_start'], config['loss_kwargs']['T_end']) == (2, 4, 8)
    assert config['network_kwargs']['model_channels'] == 16 and config['loss_kwargs']['teacher_pkl'].endswith('teacher.pkl')
    assert not (root / 'dry').exists()


def test_edges_differ_across_ranks():
    loss = EDMConsistencyDistillLoss(None, S=4, T_start=64, T_end=64)
    grids = loss.grids(64)
    draws = []
    for rank in range(2):
        misc.set_random_seed(0, rank, 0)   # the training loop's per-step seed on each rank
        edges = consistency_ops.sample_segment_and_teacher_pair(grids.bounds, grids.teacher, grids.student, 32,
            torch.device('cpu'), terminal_k=grids.terminal_k)
        draws.append(edges['k_t'])
    assert not torch.equal(draws[0], draws[1])


DDP_ARGS = ['--preset=cd-tiny-img16', '--batch=16', '--duration=1024', '--status=512', '--snapshot=1024', '--checkpoint=1024']


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.fixture(scope='module')
def ddp_run(workdir):
    """A distillation run of 2 processes on one machine."""
    root = workdir
    run_script('train_edm2.py', f'--outdir={root / "ddp"}', f'--data={root / "d16.zip"}', f'--teacher={root / "teacher.pkl"}',
        *DDP_ARGS, launcher=torchrun())
    return root / 'ddp'


@pytest.mark.slow
def test_ddp_distillation_keeps_ranks_identical(ddp_run):
    # The loop runs check_ddp_consistency after each checkpoint: it fails if the ranks' weights differ.
    assert (ddp_run / 'training-state-0000001.pt').is_file()
    stats = read_stats(ddp_run)
    assert all(math.isfinite(s['Loss/loss']) for s in stats if 'Loss/loss' in s)


def launch_two_nodes(workdir, outdirs, *extra):
    """Two torchrun launches joined by a static rendezvous on 127.0.0.1, one process each, as on two machines;
    returns their exit codes and outputs."""
    root = workdir
    port = free_port()
    launches = [subprocess.Popen(script_command('train_edm2.py', f'--outdir={outdir}', f'--data={root / "d16.zip"}',
        f'--teacher={root / "teacher.pkl"}', *DDP_ARGS, *extra,
        launcher=torchrun(1, nnodes=2, node_rank=node, master_addr='127.0.0.1', master_port=port)),
        cwd=REPO_ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node, outdir in enumerate(outdirs)]
    outputs = [launch.communicate(timeout=600)[0] for launch in launches]
    return [launch.returncode for launch in launches], outputs


@pytest.mark.slow
def test_two_node_distillation_equals_one_node(workdir, ddp_run):
    root = workdir
    codes, outputs = launch_two_nodes(workdir, [root / 'nodes'] * 2)
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert 'Processes:          2 on cpu' in outputs[0] and 'Processes:' not in outputs[1]  # only rank 0 reports

    # Same ranks, same data order and seeds: the two-node run must end where the one-node run ends.
    nodes = load_state(root / 'nodes' / 'training-state-0000001.pt')
    single = load_state(ddp_run / 'training-state-0000001.pt')
    assert nodes['state']['cur_nimg'] == single['state']['cur_nimg'] == 1024
    assert_same_state(single, nodes)

    # Resuming where the second machine cannot see the run directory is refused, not started from scratch.
    codes, outputs = launch_two_nodes(workdir, [root / 'nodes', root / 'elsewhere'], '--duration=2048')
    assert codes[0] != 0 and codes[1] != 0
    assert 'found different training states to resume from' in outputs[0]
    assert "['training-state-0000001.pt', None]" in outputs[0]
