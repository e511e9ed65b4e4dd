"""training/plots.py: the PNG curves of a run directory, drawn from real training and distillation runs."""

import json
import math
import os

import numpy as np
import PIL.Image
import pytest

import helpers
from training import plots

BLUE = (31, 119, 180)  # matplotlib's first line colour (C0), the colour of every single-line panel

#----------------------------------------------------------------------------
# Runs made with the command line: a short teacher run and a distillation run from its last snapshot.

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('plots')
    data = helpers.make_digits_zip(root / 'd16.zip', resolution=16, max_images=64)
    teacher = root / 'teacher'
    helpers.run_script('train_edm2.py', f'--outdir={teacher}', f'--data={data}', '--cond=False', '--preset=tiny-img16',
        '--channels=8', '--duration=2Ki', '--status=256', '--snapshot=1Ki', '--checkpoint=1Ki')
    student = root / 'student'
    helpers.run_script('train_edm2.py', f'--outdir={student}', f'--data={data}', '--cond=False', '--preset=cd-tiny-img16',
        f'--teacher={teacher}/network-snapshot-0000002-0.100.pkl', '--duration=1Ki', '--snapshot=1Ki',
        '--checkpoint=1Ki', '--status=256')
    return dict(teacher=str(teacher), student=str(student))


def finite_count(rows, name, kimg_min=None):
    """Rows where both kimg and `name` are finite numbers (and kimg >= kimg_min)."""
    def finite(value):
        return isinstance(value, (int, float)) and math.isfinite(value)
    return sum(1 for row in rows if finite(row.get(name)) and finite(row.get('Progress/kimg'))
        and (kimg_min is None or row['Progress/kimg'] >= kimg_min))


def check_png(path, size):
    """A PNG of `size` pixels that holds drawn curves (many pixels of the first line colour)."""
    with PIL.Image.open(path) as image:
        assert image.format == 'PNG' and image.size == size, (path, image.format, image.size)
        pixels = np.asarray(image.convert('RGB')).astype(np.int32)
    assert pixels.std() > 10, path
    blue = (np.abs(pixels - np.array(BLUE)).sum(axis=-1) < 60).sum()
    assert blue > 100, (path, blue)
    assert not [name for name in os.listdir(os.path.dirname(path)) if name.endswith('.tmp')]


def stats_dir(tmp_path, rows, name='run'):
    """A run directory holding only a stats.jsonl with these rows (written as the training loop writes
    them, NaN as a bare NaN)."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    with open(run_dir / 'stats.jsonl', 'w') as f:
        f.write(''.join(json.dumps(row) + '\n' for row in rows))
    return str(run_dir)

#----------------------------------------------------------------------------

@pytest.mark.slow
def test_command_line_plots_a_distillation_run(runs, tmp_path):
    outdir = tmp_path / 'out'
    result = helpers.run_script('-m', 'training.plots', runs['student'], f'--outdir={outdir}')
    assert result.stdout.split() == [str(outdir / 'loss.png'), str(outdir / 'cd.png')]
    assert sorted(os.listdir(outdir)) == ['cd.png', 'loss.png']  # no metrics-val.jsonl: no validation.png
    check_png(outdir / 'loss.png', (700, 900))
    check_png(outdir / 'cd.png', (1400, 600))


@pytest.mark.slow
def test_every_finite_row_is_drawn(runs):
    rows = helpers.read_stats(runs['student'])
    written = plots.plot_run(runs['student'])  # default outdir: RUN_DIR/plots
    outdir = os.path.join(runs['student'], 'plots')
    assert list(written) == [os.path.join(outdir, 'loss.png'), os.path.join(outdir, 'cd.png')]
    loss = written[os.path.join(outdir, 'loss.png')]
    assert loss == {name: {name: finite_count(rows, name)} for name in plots.LOSS_PANELS}
    assert all(finite_count(rows, name) == 4 for name in plots.LOSS_PANELS)  # 1Ki images, a status line per 256
    cd = written[os.path.join(outdir, 'cd.png')]
    assert list(cd) == [title for title, _prefix in plots.CD_GROUPS]
    for (title, prefix), panel in zip(plots.CD_GROUPS, cd.values()):
        names = sorted({name for row in rows for name in row if name.startswith(prefix)})
        assert names and sorted(f'CD/{label}' for label in panel) == names, (title, panel)
        assert all(count == finite_count(rows, f'CD/{label}') > 0 for label, count in panel.items()), (title, panel)
    assert {'T_target', 'T_edges'} <= set(cd['timesteps: T_target, T_edges'])
    assert {'frac_terminal', 'frac_boundary', 'frac_general'} <= set(cd['edge-class fractions'])


@pytest.mark.slow
def test_teacher_run_has_only_the_loss_plot(runs, tmp_path):
    rows = helpers.read_stats(runs['teacher'])
    written = plots.plot_run(runs['teacher'], outdir=str(tmp_path / 'new' / 'folder'))
    assert list(written) == [str(tmp_path / 'new' / 'folder' / 'loss.png')]
    (counts,) = written.values()
    assert counts['Loss/loss'] == {'Loss/loss': finite_count(rows, 'Loss/loss')} == {'Loss/loss': 8}
    check_png(tmp_path / 'new' / 'folder' / 'loss.png', (700, 900))


@pytest.mark.slow
def test_kimg_min_leaves_out_early_points(runs, tmp_path):
    rows = helpers.read_stats(runs['student'])
    written = plots.plot_run(runs['student'], outdir=str(tmp_path), kimg_min=0.6)
    loss, cd = written.values()
    assert loss['Loss/loss']['Loss/loss'] == finite_count(rows, 'Loss/loss', kimg_min=0.6) == 2
    assert cd['edge-class fractions']['frac_general'] == 2

#----------------------------------------------------------------------------
# Validation rows, written by hand in the format of training/monitoring.py.

def val_row(kimg, network, metric, value, sampler, steps, nfe, best=False):
    return dict(kimg=kimg, nimg=round(kimg * 1000), network=network, metric=metric, value=value, sampler=sampler,
        steps=steps, nfe=nfe, ema_std=0.1 if network == 'trained' else None, images=64, seconds=0.1, best=best,
        snapshot=f'network-snapshot-{int(kimg):07d}-0.100.pkl' if network == 'trained' else None)


def test_validation_plot(tmp_path):
    stats = [{'Progress/kimg': 0.0, 'timestamp': 1.0}, {'Progress/kimg': 1.024, 'Loss/loss': 2.0, 'timestamp': 2.0}]
    run_dir = stats_dir(tmp_path, stats)
    rows = [val_row(1.024, 'teacher', 'fid', 30.0, 'euler', 4, 4), val_row(1.024, 'teacher', 'fid', 12.0, 'heun', 32, 63)]
    rows += [val_row(kimg, 'trained', 'fid', value, 'euler', 4, 4, best=best) for kimg, value, best in
        [(1.024, 40.0, True), (2.048, 25.0, True), (3.072, float('nan'), False), (4.096, 27.0, False)]]
    rows += [val_row(kimg, 'trained', 'fd_dinov2', 300.0 - kimg, 'euler', 4, 4) for kimg in (1.024, 2.048)]
    with open(os.path.join(run_dir, 'metrics-val.jsonl'), 'w') as f:
        f.write(''.join(json.dumps(row) + '\n' for row in rows) + '{"kimg": 5.12, "netw')  # a row cut short by a kill
    written = plots.plot_run(run_dir)
    path = os.path.join(run_dir, 'plots', 'validation.png')
    assert list(written) == [os.path.join(run_dir, 'plots', 'loss.png'), path]
    assert written[path] == {
        'fid': {'trained euler 4 NFE': 3, 'teacher euler 4 NFE': 1, 'teacher heun 63 NFE': 1},  # NaN left out
        'fd_dinov2': {'trained euler 4 NFE': 2},
    }
    check_png(path, (700, 600))
    assert plots.baseline_label(rows[1]) == 'teacher heun 63 NFE'
    later = plots.plot_run(run_dir, outdir=str(tmp_path / 'later'), kimg_min=2)
    assert later[str(tmp_path / 'later' / 'validation.png')]['fid'] == \
        {'trained euler 4 NFE': 2, 'teacher euler 4 NFE': 1, 'teacher heun 63 NFE': 1}  # baselines stay


def test_a_run_with_few_rows_still_plots(tmp_path):
    first = stats_dir(tmp_path, [{'Progress/kimg': 0.0, 'Timing/sec_per_kimg': float('nan'), 'timestamp': 1.0}], 'first')
    (counts,) = plots.plot_run(first).values()
    assert counts == {name: {name: 0} for name in plots.LOSS_PANELS}
    with PIL.Image.open(os.path.join(first, 'plots', 'loss.png')) as image:
        assert image.size == (700, 900)
    rows = [{'Progress/kimg': 0.256, 'Loss/loss': float('nan'), 'Loss/grad_norm': float('nan'), 'Loss/learning_rate': 1e-3,
             'Loss/nonfinite_step': 1.0, 'CD/frac_general': 0.5}]
    rows.append(dict(rows[0], **{'Progress/kimg': 0.512, 'Loss/loss': 1.5, 'Loss/grad_norm': 3.0, 'Loss/nonfinite_step': 0}))
    two = stats_dir(tmp_path, rows, 'two')
    written = plots.plot_run(two)
    loss = written[os.path.join(two, 'plots', 'loss.png')]
    assert loss['Loss/loss'] == {'Loss/loss': 1, 'NaN/Inf steps': 1}
    assert loss['Loss/learning_rate'] == {'Loss/learning_rate': 2, 'NaN/Inf steps': 1}
    assert written[os.path.join(two, 'plots', 'cd.png')] == {'edge-class fractions': {'frac_general': 2}}
    check_png(os.path.join(two, 'plots', 'cd.png'), (700, 300))


def test_quality_vs_steps(tmp_path):
    rows = [dict(name='student', nfe=steps, value=value) for steps, value in [(1, 20.0), (2, 12.0), (4, 8.0), (8, 7.0)]]
    rows += [dict(name='teacher euler', nfe=steps, value=300.0 / steps) for steps in (8, 4, 2, 1)]
    rows += [dict(name='teacher heun', nfe=2 * steps - 1, value=value) for steps, value in [(1, 250.0), (2, float('nan')), (4, 30.0)]]
    path = tmp_path / 'sub' / 'quality.png'
    counts = plots.plot_quality_vs_steps(rows, str(path), 'fid')
    assert counts == {'student': 4, 'teacher euler': 4, 'teacher heun': 2}
    check_png(path, (700, 450))

#----------------------------------------------------------------------------
# Errors: one line each.

def test_errors(tmp_path):
    result = helpers.invoke(plots.cmdline, tmp_path / 'missing')
    helpers.assert_user_error(result, 'RUN_DIR', 'missing', 'does not exist')
    (tmp_path / 'file').write_text('')
    helpers.assert_user_error(helpers.invoke(plots.cmdline, tmp_path / 'file'), 'is not a directory')
    (tmp_path / 'empty').mkdir()
    helpers.assert_user_error(helpers.invoke(plots.cmdline, tmp_path / 'empty'), 'has no stats.jsonl')
    run_dir = stats_dir(tmp_path, [{'Progress/kimg': 0.0}])
    helpers.assert_user_error(helpers.invoke(plots.cmdline, run_dir, f'--outdir={tmp_path / "file" / "x"}'), '--outdir')
    result = helpers.invoke(plots.cmdline, run_dir, '--kimg-min=-1')
    assert result.exit_code == 2 and '--kimg-min' in result.stderr
    assert not os.path.exists(os.path.join(run_dir, 'plots'))


def test_command_prints_the_paths(tmp_path):
    run_dir = stats_dir(tmp_path, [{'Progress/kimg': 0.256, 'Loss/loss': 1.0, 'Loss/grad_norm': 2.0, 'Loss/learning_rate': 1e-3}])
    result = helpers.invoke(plots.cmdline, run_dir, f'--outdir={tmp_path / "out"}')
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout.split() == [str(tmp_path / 'out' / 'loss.png')]
