"""bench/recipe_study.py end to end in its --quick form: real distillation runs of the quick start's teacher,
the report, its JSON and figures, and a rerun that reuses the finished runs."""

import json
import math
import os

import pytest

from helpers import run_script


@pytest.mark.slow
def test_quick_study_reports_every_run_and_resumes(tmp_path):
    outdir = tmp_path / 'study'
    first = run_script('bench/recipe_study.py', f'--outdir={outdir}', '--quick', timeout=900)
    with open(outdir / 'study.json') as f:
        study = json.load(f)

    screened = [row['name'] for row in study['screening']]
    assert screened[:3] == ['baseline', 'lr-0.004', 'solver-ddim'], screened
    assert math.isfinite(study['teacher_heun']) and study['target'] == pytest.approx(1.10 * study['teacher_heun'])
    for row in study['screening'] + study['seeded']:
        assert math.isfinite(row['final']) and row['best'] <= row['final'], row
        assert row['curve'] and all(math.isfinite(fd) for _nimg, _seconds, fd in row['curve']), row
        assert row['reached_nimg'] is None or row['final'] <= study['target'] or row['best'] <= study['target']
    # Two seeds of the best screened configuration (the baseline keeps its one); it gets the EMA scan and the sweep.
    seeds = {}
    for row in study['seeded']:
        seeds.setdefault(row['name'], set()).add(row['seed'])
    assert seeds.pop('baseline') == {0} and seeds == {study['best']: {0, 1}}, seeds
    assert study['best'] == min((r for r in study['screening'] if r['name'] != 'baseline'), key=lambda r: r['late'])['name']
    assert set(study['phema']) == {'0.05', '0.1'} and all(math.isfinite(v) for v in study['phema'].values())
    assert set(study['sweep']) == {'2'} and all(math.isfinite(v) for v in study['sweep']['2'])
    for name in ('study.md', 'fd-vs-images.png', 'fd-vs-time.png'):
        assert os.path.getsize(outdir / name) > 0, name
    report = (outdir / 'study.md').read_text()
    assert '| solver-ddim | --teacher_solver=ddim |' in report and 'Post-hoc EMA' in report

    # A rerun trains nothing and reports the same numbers.
    runs = sorted(os.listdir(outdir / 'runs'))
    second = run_script('bench/recipe_study.py', f'--outdir={outdir}', '--quick', timeout=900)
    assert 'Training from' in first.stdout and 'Training from' not in second.stdout
    assert sorted(os.listdir(outdir / 'runs')) == runs
    with open(outdir / 'study.json') as f:
        assert json.load(f)['screening'] == study['screening']


def test_unknown_configuration_is_one_line(tmp_path):
    result = run_script('bench/recipe_study.py', f'--outdir={tmp_path}', '--only=baseline,nonsense', check=False)
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert "['nonsense']" in result.stderr and '--only' in result.stderr
    assert not os.listdir(tmp_path)  # refused before anything was made
