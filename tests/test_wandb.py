"""Tests for the optional Weights & Biases logging (train_edm2.py --wandb, training/wandb_logging.py).

W&B runs offline only (WANDB_MODE=offline and --wandb_mode=offline): nothing leaves the machine. What a
run logged is read back from its offline transaction log with W&B's own reader, `wandb leet inspect`.
"""

import glob
import json
import os
import subprocess
import sys

import click
import pytest

import dnnlib
import train_edm2
from helpers import REPO_ROOT, error_line, make_digits_zip, read_stats, run_script, script_command, script_env

# data16 (a tiny dataset ZIP) and detectors (tiny stand-ins for the metric detectors) are conftest.py's.

TINY_RUN = ['--cond=False', '--preset=tiny-img16', '--channels=8', '--status=256', '--snapshot=1Ki', '--checkpoint=1Ki']


@pytest.fixture
def wandb_module():
    return pytest.importorskip('wandb')


@pytest.fixture
def wandb_env(tmp_path):
    """script_env() for offline W&B: no setting of the caller's W&B setup leaks in, and W&B's
    per-user folders are temporary ones."""
    env = {name: value for name, value in script_env().items() if not name.startswith('WANDB_')}
    home = tmp_path / 'wandb-home'
    env.update(WANDB_MODE='offline', WANDB_ERROR_REPORTING='false', WANDB_CONFIG_DIR=str(home / 'config'),
        WANDB_CACHE_DIR=str(home / 'cache'), WANDB_DATA_DIR=str(home / 'data'))
    return env


@pytest.fixture(scope='module')
def digits16(tmp_path_factory):
    return make_digits_zip(tmp_path_factory.mktemp('digits') / 'd16.zip', resolution=16, max_images=64)


def offline_runs(run_dir):
    """The offline W&B run folders of a run directory, oldest first."""
    return sorted(glob.glob(os.path.join(run_dir, 'wandb', 'offline-run-*')))


def inspect_run(folder, env, *options):
    """Output of `wandb leet inspect --json` on an offline run folder."""
    result = subprocess.run(script_command('-m', 'wandb', 'leet', 'inspect', '--json', *options, folder), env=env,
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def history(folder, env):
    """{step: logged values} of an offline run, as W&B stored them."""
    rows = {}
    for line in inspect_run(folder, env).splitlines():
        record = json.loads(line)
        if record.get('type') == 'history':
            item = record['history']['item']
            rows[int(item['_step'])] = item
    return rows


def summary(folder, env):
    """W&B's summary of an offline run: run id, name, project, tags, config, summary values."""
    return json.loads(inspect_run(folder, env, '--summary'))


def train(run_dir, data, env, *args, cwd=REPO_ROOT):
    return run_script(os.path.join(REPO_ROOT, 'train_edm2.py'), f'--outdir={run_dir}', f'--data={data}', *TINY_RUN,
        *args, env=env, cwd=cwd)


def assert_matches_stats(logged, stats_rows):
    """Every stats.jsonl row was logged at its image count, with the same finite values."""
    for row in stats_rows:
        step = round(row['Progress/kimg'] * 1000)
        assert step in logged, (step, sorted(logged))
        for name, value in row.items():
            if name == 'timestamp':
                continue
            if isinstance(value, float) and value != value:  # NaN: not logged
                assert name not in logged[step], (step, name)
            else:
                assert logged[step][name] == pytest.approx(value, rel=2e-5, abs=1e-6), (step, name)

#----------------------------------------------------------------------------
# The command line (in-process, fast).

def parse_args(args):
    ctx = train_edm2.cmdline.make_context('train_edm2.py', list(args))
    return {key: value for key, value in ctx.params.items() if key not in ('outdir', 'dry_run')}


@pytest.mark.parametrize('option', ['--wandb_project=mine', '--wandb_entity=team', '--wandb_run=name',
    '--wandb_tags=a,b', '--wandb_mode=offline'])
def test_wandb_options_need_wandb(option, data16):
    with pytest.raises(click.BadParameter, match='add --wandb') as err:
        train_edm2.setup_training_config(**parse_args([f'--data={data16}', '--outdir=x', '--cond=False',
            '--preset=tiny-img16', option]))
    assert err.value.param_hint == option.split('=')[0]


def test_wandb_config_forwards_only_what_is_given(data16, wandb_module):
    base = [f'--data={data16}', '--outdir=x', '--cond=False', '--preset=tiny-img16']
    assert 'wandb_kwargs' not in train_edm2.setup_training_config(**parse_args(base))
    c = train_edm2.setup_training_config(**parse_args([*base, '--wandb']))
    assert c.wandb_kwargs == dict(class_name='training.wandb_logging.WandbLogger')
    c = train_edm2.setup_training_config(**parse_args([*base, '--wandb', '--wandb_project=p', '--wandb_entity=e',
        '--wandb_run=r', '--wandb_tags= a, b,,c ', '--wandb_mode=disabled']))
    assert c.wandb_kwargs == dict(class_name='training.wandb_logging.WandbLogger', project='p', entity='e', name='r',
        tags=['a', 'b', 'c'], mode='disabled')
    json.dumps(c)  # recorded in training_options.json


def test_missing_wandb_package_is_one_line(tmp_path, data16, monkeypatch):
    # The subprocess finds a wandb.py first on its path that fails to import, as a missing package does.
    shadow = tmp_path / 'shadow'
    shadow.mkdir()
    (shadow / 'wandb.py').write_text("raise ImportError(\"No module named 'wandb'\")\n")
    env = script_env()
    env['PYTHONPATH'] = str(shadow) + os.pathsep + env['PYTHONPATH']
    result = run_script('train_edm2.py', f'--outdir={tmp_path}/run', f'--data={data16}', *TINY_RUN, '--duration=1Ki',
        '--wandb', env=env, check=False)
    assert result.returncode != 0
    line = error_line(result.stderr)
    assert 'wandb' in line and 'pip install wandb' in line and 'without --wandb' in line, line
    assert not glob.glob(f'{tmp_path}/run/*.pkl')  # stopped before training

    # The logger itself says the same when built by other code.
    from training import wandb_logging
    monkeypatch.setitem(sys.modules, 'wandb', None)  # `import wandb` raises ImportError
    with pytest.raises(dnnlib.UserError, match='pip install wandb'):
        wandb_logging.WandbLogger(run_dir=str(tmp_path), mode='offline')

#----------------------------------------------------------------------------
# The logger on its own (a subprocess: W&B patches the console of the process that runs it).

LOGGER_SCRIPT = '''
import math, sys, torch
from training.wandb_logging import WandbLogger
logger = WandbLogger(run_dir=sys.argv[1], options=dict(total_nimg=2048, loss_kwargs=dict(S=4)), tags=['unit'])
logger.log_stats(0, {'Progress/kimg': 0.0, 'Loss/loss': math.nan, 'Timing/sec_per_kimg': math.inf})
logger.log_stats(512, {'Progress/kimg': 0.512, 'Loss/loss': 0.25})
row = dict(kimg=0.512, nimg=512, snapshot=None, metric='fid', images=16, seconds=1.0, best=False, ema_std=None)
logger.log_validation(512, [
    dict(row, network='teacher', value=3.5, sampler='heun', steps=32, nfe=63),
    dict(row, network='teacher', value=9.0, sampler='euler', steps=4, nfe=4),
    dict(row, network='trained', value=5.0, sampler='euler', steps=4, nfe=4, best=True,
        snapshot='network-snapshot-0000000-0.100.pkl', ema_std=0.1),
    dict(row, network='trained', metric='fd_dinov2', value=math.nan, sampler='euler', steps=4, nfe=4),
], torch.arange(5 * 16 * 16, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(5, 1, 16, 16))
logger.log_stats(256, {'Loss/loss': 1.0})  # below the last step: dropped, as W&B would
logger.finish()
'''


def test_logger_records(tmp_path, wandb_env, wandb_module):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    run_script('-c', LOGGER_SCRIPT, run_dir, env=wandb_env, cwd=tmp_path)
    [folder] = offline_runs(run_dir)
    logged = history(folder, wandb_env)
    assert sorted(logged) == [0, 512]
    assert 'Loss/loss' not in logged[0] and 'Timing/sec_per_kimg' not in logged[0]  # NaN/Inf left out
    values = logged[512]
    assert values['Loss/loss'] == 0.25 and values['val/fid'] == 5.0 and 'val/fd_dinov2' not in values
    assert values['baseline/teacher_heun63/fid'] == 3.5 and values['baseline/teacher_euler4/fid'] == 9.0
    assert values['val/samples._type'] == 'image-file'
    assert (values['val/samples.width'], values['val/samples.height']) == (48, 32)  # 5 images: 3 columns, 2 rows
    assert os.path.isfile(os.path.join(folder, 'files', values['val/samples.path']))
    info = summary(folder, wandb_env)
    assert info['run_id'] == (run_dir / 'wandb-run-id.txt').read_text().strip()
    assert (info['name'], info['project'], info['tags']) == ('run', 'mscd-edm2', ['unit'])
    assert info['config']['total_nimg'] == 2048 and info['config']['loss_kwargs'] == dict(S=4)
    assert info['summary']['val/fid_best'] == 5.0
    assert info['summary']['val/fid_best_snapshot'] == 'network-snapshot-0000000-0.100.pkl'

#----------------------------------------------------------------------------
# Training runs through the command line, offline.

@pytest.mark.slow
def test_training_run_logs_and_resumes_into_the_same_run(tmp_path, digits16, wandb_env, wandb_module):
    run_dir, cwd = tmp_path / 'run', tmp_path / 'cwd'
    cwd.mkdir()
    train(run_dir, digits16, wandb_env, '--duration=1Ki', '--wandb', '--wandb_mode=offline', '--wandb_tags=test',
        cwd=cwd)
    assert not os.listdir(cwd)  # W&B's files are in the run directory
    run_id = (run_dir / 'wandb-run-id.txt').read_text().strip()
    [first] = offline_runs(run_dir)
    stats = read_stats(run_dir)
    assert [round(row['Progress/kimg'] * 1000) for row in stats] == [0, 256, 512, 768, 1024]
    logged = history(first, wandb_env)
    assert sorted(logged) == [0, 256, 512, 768, 1024]
    assert_matches_stats(logged, stats)
    info = summary(first, wandb_env)
    assert (info['run_id'], info['name'], info['tags'], info['state']) == (run_id, 'run', ['test'], 'finished')
    assert info['config']['total_nimg'] == 1024 and info['config']['batch_size'] == 32

    # Rerunning with a longer duration resumes the run, and the W&B run with it (its mode from $WANDB_MODE).
    train(run_dir, digits16, wandb_env, '--duration=2Ki', '--wandb', cwd=cwd)
    assert (run_dir / 'wandb-run-id.txt').read_text().strip() == run_id
    assert offline_runs(run_dir)[0] == first
    [second] = offline_runs(run_dir)[1:]
    resumed = history(second, wandb_env)
    assert sorted(resumed) == [1280, 1536, 1792, 2048]
    stats = read_stats(run_dir)
    assert_matches_stats(resumed, [row for row in stats if row['Progress/kimg'] > 1.024 + 1e-6])
    info = summary(second, wandb_env)
    assert info['run_id'] == run_id and info['config']['total_nimg'] == 2048


@pytest.mark.slow
def test_training_run_logs_validation(tmp_path, digits16, detectors, wandb_env, wandb_module):
    _models, paths = detectors
    ref = tmp_path / 'ref.pkl'
    run_script('calculate_metrics.py', 'ref', f'--data={digits16}', f'--dest={ref}', '--metrics=fid',
        f'--detector=fid={paths["fid"]}', '--workers=0', env=wandb_env)
    run_dir = tmp_path / 'run'
    train(run_dir, digits16, wandb_env, '--duration=1Ki', f'--val_ref={ref}', f'--detector=fid={paths["fid"]}',
        '--val_num=16', '--val_steps=4', '--wandb', '--wandb_mode=offline', '--wandb_run=validated', cwd=tmp_path)
    with open(run_dir / 'metrics-val.jsonl') as f:
        [row] = [json.loads(line) for line in f]
    assert (row['network'], row['metric'], row['nimg']) == ('trained', 'fid', 1024)
    [folder] = offline_runs(run_dir)
    logged = history(folder, wandb_env)
    assert logged[1024]['val/fid'] == pytest.approx(row['value'], rel=1e-6)
    assert logged[1024]['val/samples._type'] == 'image-file'
    assert (logged[1024]['val/samples.width'], logged[1024]['val/samples.height']) == (64, 64)  # 16 images, 4x4
    info = summary(folder, wandb_env)
    assert info['name'] == 'validated' and info['summary']['val/fid_best'] == pytest.approx(row['value'], rel=1e-6)
