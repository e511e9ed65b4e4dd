"""Nothing silent, nothing lost: runs killed at random moments resume to the same result, a second
process on a run directory is refused, diverging runs stop, and bad inputs are one-line errors."""

import itertools
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import time

import pytest
import torch

from helpers import (REPO_ROOT, assert_same_state, image_name, load_pickle, load_state, make_teacher, read_stats, read_zip,
    run_script, script_command, script_env, write_zip)
from torch_utils import distributed as dist
from torch_utils import misc

#----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def safety_dir(tmp_path_factory, data16, teacher16):
    """Room for this module's runs (root), conftest.py's data16 (data) and teacher16 (teacher)."""
    return dict(root=tmp_path_factory.mktemp('safety'), data=data16, teacher=teacher16)


CD_ARGS = ['--preset=cd-tiny-img16', '--cond=False', '--batch=16', '--duration=3Ki', '--status=512', '--snapshot=1Ki',
    '--checkpoint=1Ki']


def train_args(safety, outdir, *extra):
    """train_edm2.py's arguments for a CD run of the module's teacher on its data."""
    return [f'--outdir={outdir}', f'--data={safety["data"]}', f'--teacher={safety["teacher"]}', *CD_ARGS, *extra]


def run_until(args, trigger):
    """Run train_edm2.py with args; SIGKILL it once training has begun and its later output contains
    `trigger` (a string), or `trigger` seconds after training began. Returns (killed, output)."""
    proc = subprocess.Popen(script_command('train_edm2.py', *args), cwd=REPO_ROOT, env=script_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
    os.set_blocking(proc.stdout.fileno(), False)
    output, began = b'', None
    while proc.poll() is None:
        output += proc.stdout.read() or b''
        text = output.decode(errors='replace')
        if began is None and 'Training from' in text:
            began = time.time()
        after = text.split('Training from', 1)[-1] if began is not None else None
        if after is not None and ((trigger in after) if isinstance(trigger, str) else (time.time() - began > trigger)):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True, text
        time.sleep(0.002)
    output += proc.stdout.read() or b''
    assert proc.returncode == 0, output.decode(errors='replace')[-3000:]
    return False, output.decode(errors='replace')


@pytest.mark.slow
def test_kills_at_random_moments_resume_to_the_uninterrupted_result(safety_dir):
    root = safety_dir['root']
    run_until(train_args(safety_dir, root / 'straight'), trigger=float('inf'))

    # Kills while saving a training state, while saving snapshots, after a status line, and at random times.
    rng = random.Random(1)
    triggers = ['Saving ' + str(root / 'killed' / 'training-state-0000001.pt'), rng.uniform(0.2, 1.5),
        'Saving ' + str(root / 'killed' / 'network-snapshot-0000002-0.050.pkl'), 'Status: kimg', rng.uniform(0.2, 1.5),
        'Saving ' + str(root / 'killed' / 'training-state-0000003.pt')]
    kills = 0
    for trigger in triggers:
        killed, _ = run_until(train_args(safety_dir, root / 'killed'), trigger)
        kills += killed
        if not killed:
            break
    if killed:
        run_until(train_args(safety_dir, root / 'killed'), trigger=float('inf'))
    assert kills >= 5

    straight = load_state(root / 'straight' / 'training-state-0000003.pt')
    resumed = load_state(root / 'killed' / 'training-state-0000003.pt')
    assert_same_state(straight, resumed, parts=('net', 'ema', 'optimizer', 'loss_fn'))
    snapshot_a = load_pickle(root / 'straight' / 'network-snapshot-0000003-0.100.pkl')['ema']
    snapshot_b = load_pickle(root / 'killed' / 'network-snapshot-0000003-0.100.pkl')['ema']
    assert all(torch.equal(a, b) for a, b in zip(snapshot_a.state_dict().values(), snapshot_b.state_dict().values()))

    # No temporary files, no repeated statistics, and the log tells one story.
    assert not [name for name in os.listdir(root / 'killed') if name.endswith('.tmp')]
    rows_a, rows_b = read_stats(root / 'straight'), read_stats(root / 'killed')
    assert [row['Progress/kimg'] for row in rows_b] == [row['Progress/kimg'] for row in rows_a]
    assert [row.get('Loss/loss') for row in rows_b] == [row.get('Loss/loss') for row in rows_a]
    status = [line.split()[2] for line in open(root / 'killed' / 'log.txt') if line.startswith('Status: ')]
    assert status == sorted(set(status), key=float)
    assert (root / 'killed' / 'log-discarded.txt').is_file()


@pytest.mark.slow
def test_second_process_on_a_run_directory_is_refused(safety_dir):
    busy = safety_dir['root'] / 'busy'
    first = subprocess.Popen(script_command('train_edm2.py', *train_args(safety_dir, busy, '--duration=1Gi')), cwd=REPO_ROOT,
        env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if line.startswith('Training from'):
                break
        second = run_script('train_edm2.py', *train_args(safety_dir, busy, '--duration=1Gi'), check=False)
        assert second.returncode == 1
        assert f'is in use by process {first.pid}' in second.stderr and 'Traceback' not in second.stderr
    finally:
        first.kill()
        first.wait()
    # The lock dies with its process: the run resumes at once.
    run_script('train_edm2.py', *train_args(safety_dir, busy, '--duration=1Ki'))


def test_run_directory_lock_is_exclusive(tmp_path):
    held = dist.RunDirectoryLock(str(tmp_path))
    with pytest.raises(ValueError, match=f'in use by process {os.getpid()}'):
        dist.RunDirectoryLock(str(tmp_path))
    held.file.close()  # what process exit does
    dist.RunDirectoryLock(str(tmp_path))


@pytest.mark.slow
def test_diverging_run_stops_without_saving_nan(safety_dir, tmp_path):
    result = run_script('train_edm2.py', f'--outdir={tmp_path / "run"}', f'--data={safety_dir["data"]}', '--cond=False',
        '--preset=tiny-img16', '--channels=8', '--duration=4Ki', '--status=256', '--snapshot=1Ki', '--checkpoint=1Ki',
        '--lr=1e30', check=False)
    output = result.stdout + result.stderr  # the run's log takes stderr too
    assert result.returncode == 1 and 'Traceback' not in output
    assert 'optimizer steps in a row had NaN/Inf losses or gradients' in output.strip().splitlines()[-1]
    assert 'Warning:' in output and 'NaN/Inf' in (tmp_path / 'run' / 'log.txt').read_text()
    saved = sorted(name for name in os.listdir(tmp_path / 'run') if name.endswith(('.pt', '.pkl')))
    assert saved == ['network-snapshot-0000000-0.050.pkl', 'network-snapshot-0000000-0.100.pkl']  # from before step 1


@pytest.mark.parametrize('problem', ['nan_teacher', 'plain_run_as_cd', 'outdir_is_a_file', 'zero_byte_teacher'])
def test_bad_inputs_are_one_line_errors(problem, safety_dir, tmp_path):
    outdir = tmp_path / 'run'
    args = train_args(safety_dir, outdir, '--duration=1Ki')
    if problem == 'nan_teacher':
        teacher = make_teacher(tmp_path / 'nan.pkl', label_dim=0)
        with torch.no_grad():
            teacher.unet.enc['16x16_block0'].conv_res1.weight[0, 0, 0, 0] = float('nan')
        with open(tmp_path / 'nan.pkl', 'wb') as f:
            pickle.dump(dict(ema=teacher), f)
        args.append(f'--teacher={tmp_path / "nan.pkl"}')
        expected = 'holds non-finite values (NaN or inf) in unet.enc.16x16_block0.conv_res1.weight'
    elif problem == 'plain_run_as_cd':
        plain = [f'--outdir={outdir}', f'--data={safety_dir["data"]}', '--cond=False', '--preset=tiny-img16',
            '--channels=16', '--duration=64', '--snapshot=0', '--checkpoint=1Ki']
        assert run_script('train_edm2.py', *plain, check=False).returncode == 0
        shutil.copy(outdir / 'log.txt', tmp_path / 'log-before.txt')
        expected = "loss_kwargs.class_name: run 'training.training_loop.EDM2Loss', now 'training.loss_cd.EDMConsistencyDistillLoss'"
    elif problem == 'outdir_is_a_file':
        outdir.write_text('not a directory')
        expected = 'is a file; expected a run directory'
    else:
        (tmp_path / 'empty.pkl').write_bytes(b'')
        args.append(f'--teacher={tmp_path / "empty.pkl"}')
        expected = 'is empty or truncated'
    result = run_script('train_edm2.py', *args, check=False)
    output = result.stdout + result.stderr
    assert result.returncode in (1, 2) and 'Traceback' not in output
    assert expected in output.strip().splitlines()[-1], output[-2000:]
    if problem in ('nan_teacher', 'zero_byte_teacher'):
        assert not outdir.exists()  # the run directory is made only for a run that can start
    if problem == 'plain_run_as_cd':
        assert sorted(name for name in os.listdir(outdir) if name.endswith('.pt')) == ['training-state-0000000.pt']


@pytest.mark.slow
def test_cli_run_on_damaged_files(safety_dir, tmp_path):
    """A corrupt sample mid-run, a truncated newest training state and a bad label, through the command line."""
    data = tmp_path / 'data.zip'
    shutil.copy(safety_dir['data'], data)
    members = read_zip(data)
    order = itertools.islice(misc.InfiniteSampler(range(64), seed=0, start_idx=2048), 64)
    victim = image_name(list(order)[48])  # read by the second step after resuming at 2048 images
    good = members[victim]
    def rewrite(**changes):
        write_zip(data, {**members, **changes})
    run = tmp_path / 'run'
    args = [f'--outdir={run}', f'--data={data}', '--cond=False', '--preset=tiny-img16', '--channels=8', '--batch=32',
        '--status=512', '--snapshot=0', '--checkpoint=1Ki', '--duration=3Ki']
    run_script('train_edm2.py', *args[:-1], '--duration=2Ki')
    rewrite(**{victim: good[:len(good) // 2]})
    result = run_script('train_edm2.py', *args, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and 'Traceback' not in output
    assert victim in output.strip().splitlines()[-1] and 'after saving its state' in output
    saved = sorted(name for name in os.listdir(run) if name.endswith('.pt'))
    assert saved and load_state(run / saved[-1])['state']['cur_nimg'] % 1024 != 0

    rewrite()  # repaired; now the newest state is truncated
    newest = run / saved[-1]
    newest.write_bytes(newest.read_bytes()[:200])
    result = run_script('train_edm2.py', *args)
    assert f'Warning: cannot read {newest}' in result.stdout and (run / (saved[-1] + '.corrupt')).is_file()
    assert (run / 'training-state-0000003.pt').is_file()

    labels = json.loads(members['dataset.json'])
    labels['labels'] = [[image_name(i), -1 if i == 7 else i % 10] for i in range(64)]
    rewrite(**{'dataset.json': json.dumps(labels).encode()})
    result = run_script('train_edm2.py', *['--cond=True' if arg == '--cond=False' else arg for arg in args], check=False)
    assert result.returncode == 2 and 'img00000007.png has the label -1' in result.stderr
