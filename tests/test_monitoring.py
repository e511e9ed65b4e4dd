"""Validation while training (training/monitoring.py): the values equal generate_images.py followed by
calculate_metrics.py calc, baselines are measured once, DDP gives the value of one process, and a
resumed run keeps its best value without repeating rows."""

import json
import math
import os

import pytest

import helpers
import train_edm2


def read_rows(run_dir):
    with open(os.path.join(run_dir, 'metrics-val.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def val_setup(tmp_path_factory, detectors, teacher16):
    root = tmp_path_factory.mktemp('val')
    data = helpers.write_image_zip(root / 'd16.zip', 64, 16)
    fid = f'fid={detectors[1]["fid"]}'
    helpers.run_script('calculate_metrics.py', 'ref', f'--data={data}', f'--dest={root / "ref.pkl"}', '--metrics=fid',
        '--workers=0', f'--detector={fid}')
    return root, data, fid, teacher16


def cd_args(root, data, fid, teacher, outdir, *extra):
    return [f'--outdir={root / outdir}', f'--data={data}', '--cond=False', '--preset=cd-tiny-img16',
        f'--teacher={teacher}', '--batch=16', '--status=512', '--snapshot=1Ki', '--checkpoint=1Ki',
        f'--val_ref={root / "ref.pkl"}', f'--detector={fid}', '--val_num=24', '--val_batch=16', *extra]


@pytest.mark.slow
def test_validation_equals_generate_then_calc(val_setup):
    root, data, fid, teacher = val_setup
    helpers.run_script('train_edm2.py', *cd_args(root, data, fid, teacher, 'run', '--duration=2Ki'))
    rows = read_rows(root / 'run')
    trained = [row for row in rows if row['network'] == 'trained']
    baselines = [row for row in rows if row['network'] == 'teacher']
    assert [row['nimg'] for row in trained] == [1024, 2048]
    assert [(row['sampler'], row['steps'], row['nfe']) for row in baselines] == [('euler', 4, 4), ('heun', 32, 63)]
    assert all(row['images'] == 24 and row['metric'] == 'fid' and math.isfinite(row['value']) for row in rows)
    assert trained[0]['ema_std'] == 0.1 and trained[0]['snapshot'] == 'network-snapshot-0000001-0.100.pkl'

    # The same snapshot, seeds and detector through the two commands.
    snapshot = root / 'run' / trained[-1]['snapshot']
    helpers.run_script('generate_images.py', f'--net={snapshot}', f'--outdir={root / "images"}', '--seeds=0-23')
    result = helpers.run_script('calculate_metrics.py', 'calc', f'--images={root / "images"}', f'--ref={root / "ref.pkl"}',
        '--metrics=fid', '--num=24', '--workers=0', f'--detector={fid}')
    assert math.isclose(helpers.printed_value(result.stdout, 'fid'), trained[-1]['value'], rel_tol=1e-5)  # printed with 6 digits

    # The teacher's Euler baseline is the teacher sampled on the student's grid (the preset raises its last node).
    cd = helpers.load_pickle(snapshot)['cd']
    assert cd.sigma_min == train_edm2.PRESETS['cd-tiny-img16']['student_sigma_min']
    helpers.run_script('generate_images.py', f'--net={teacher}', f'--outdir={root / "teacher"}', '--seeds=0-23',
        '--sampler=euler', '--steps=4', f'--sigma_min={cd.sigma_min}', f'--sigma_max={cd.sigma_max}', f'--rho={cd.rho}')
    result = helpers.run_script('calculate_metrics.py', 'calc', f'--images={root / "teacher"}', f'--ref={root / "ref.pkl"}',
        '--metrics=fid', '--num=24', '--workers=0', f'--detector={fid}')
    assert math.isclose(helpers.printed_value(result.stdout, 'fid'), baselines[0]['value'], rel_tol=1e-5)

    best = min(trained, key=lambda row: row['value'])
    assert best['best'] and os.path.samefile(root / 'run' / 'network-snapshot-best-fid.pkl', root / 'run' / best['snapshot'])
    stats = helpers.read_stats(root / 'run')
    assert math.isclose(stats[3]['Val/fid'], trained[0]['value'], rel_tol=1e-5) and stats[3]['Timing/val_sec'] > 0
    log = (root / 'run' / 'log.txt').read_text()
    assert log.count('Baseline (teacher): fid') == 2 and log.count('Validation: fid') == 2


@pytest.mark.slow
def test_validation_samples_sCM_students_with_their_trigflow_sampler(val_setup):
    root, data, fid, teacher = val_setup
    args = cd_args(root, data, fid, teacher, 'scd', '--duration=1Ki', '--method=scd', '--preset=scd-tiny-img16')
    helpers.run_script('train_edm2.py', *[arg for arg in args if arg != '--preset=cd-tiny-img16'])
    trained = [row for row in read_rows(root / 'scd') if row['network'] == 'trained']
    assert [(row['sampler'], row['steps'], row['nfe']) for row in trained] == [('trigflow', 2, 2)], trained
    snapshot = root / 'scd' / trained[0]['snapshot']
    helpers.run_script('generate_images.py', f'--net={snapshot}', f'--outdir={root / "scd-images"}', '--seeds=0-23')
    result = helpers.run_script('calculate_metrics.py', 'calc', f'--images={root / "scd-images"}', f'--ref={root / "ref.pkl"}',
        '--metrics=fid', '--num=24', '--workers=0', f'--detector={fid}')
    assert math.isclose(helpers.printed_value(result.stdout, 'fid'), trained[0]['value'], rel_tol=1e-5)


@pytest.mark.slow
def test_validation_under_ddp_equals_one_process(val_setup):
    root, data, fid, teacher = val_setup
    helpers.run_script('train_edm2.py', *cd_args(root, data, fid, teacher, 'one', '--duration=1Ki'))
    helpers.run_script('train_edm2.py', *cd_args(root, data, fid, teacher, 'ddp', '--duration=1Ki'),
        launcher=helpers.torchrun(2))
    one, ddp = read_rows(root / 'one'), read_rows(root / 'ddp')
    assert [(row['network'], row['sampler']) for row in one] == [(row['network'], row['sampler']) for row in ddp]
    # Baselines sample the same teacher: equal up to the order of the float64 sums over ranks.
    for a, b in zip(one[:2], ddp[:2]):
        assert math.isclose(a['value'], b['value'], rel_tol=1e-6), (a, b)
    assert math.isfinite(ddp[-1]['value'])


@pytest.mark.slow
def test_resume_keeps_the_best_and_repeats_no_rows(val_setup):
    root, data, fid, teacher = val_setup
    args = cd_args(root, data, fid, teacher, 'resumed')
    helpers.run_script('train_edm2.py', *args, '--duration=2Ki')
    # An interrupted session validated 3 kimg but died before its training state: the row must go.
    rows = read_rows(root / 'resumed')
    with open(root / 'resumed' / 'metrics-val.jsonl', 'a') as f:
        f.write(json.dumps(dict(rows[-1], kimg=3.072, nimg=3072, value=-1.0, best=True,
            snapshot='network-snapshot-0000003-0.100.pkl')) + '\n{"kimg": 3.5, "nim')
    helpers.run_script('train_edm2.py', *args, '--duration=3Ki')
    resumed = read_rows(root / 'resumed')
    assert [row['nimg'] for row in resumed] == [1024, 1024, 1024, 2048, 3072]  # baselines once, no repeats
    assert resumed[-1]['value'] >= 0
    best = min((row for row in resumed if row['network'] == 'trained'), key=lambda row: row['value'])
    assert os.path.samefile(root / 'resumed' / 'network-snapshot-best-fid.pkl', root / 'resumed' / best['snapshot'])
    assert [row['best'] for row in resumed if row['network'] == 'trained'][-1] == (best is resumed[-1])


def test_validation_options_need_a_reference(val_setup, tmp_path):
    root, data, fid, teacher = val_setup
    result = helpers.run_script('train_edm2.py', f'--outdir={tmp_path / "run"}', f'--data={data}', '--cond=False',
        '--preset=tiny-img16', '--val_num=100', check=False)
    assert result.returncode == 2 and '--val_num configure validation, which needs reference statistics' in result.stderr
    result = helpers.run_script('train_edm2.py', *cd_args(root, data, fid, teacher, tmp_path / 'bad', '--val_metrics=fd_dinov2'),
        check=False)
    assert result.returncode == 2 and "has no statistics for ['fd_dinov2']" in result.stderr
    assert not (tmp_path / 'run').exists() and not (tmp_path / 'bad').exists()
