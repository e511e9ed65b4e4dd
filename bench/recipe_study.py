"""Which distillation recipe gets a 4-step student to teacher quality fastest, on the digits example.

Every configuration is a real `train_edm2.py` distillation run of the quick start's teacher, validated
on FD_digits at every snapshot (training/monitoring.py), so each run yields FD against training images
and against training time. The report gives, per configuration and seed, the final and best FD and the
training time until FD <= 1.10 x the teacher's Heun FD; then the FD-optimal post-hoc EMA length of the
best runs (reconstruct_phema.py) and a quality-vs-steps table of the final recipe at S = 1, 2, 4, 8.
Rerunning with the same --outdir skips finished runs. docs/results.md holds a measured report.

    python3 bench/recipe_study.py --outdir=study            # about 40 minutes on 2 CPU cores
    python3 bench/recipe_study.py --outdir=study --long     # then the two long runs, about 15 minutes more
    python3 bench/recipe_study.py --outdir=study --quick    # a smoke test of a few minutes
"""

import json
import os
import sys

import click
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import calculate_metrics  # noqa: E402
import dnnlib  # noqa: E402
import generate_images  # noqa: E402
import quickstart  # noqa: E402
from dnnlib.cli import ImageCount  # noqa: E402
from torch_utils import persistence  # noqa: E402
from training import plots  # noqa: E402
from training.monitoring import HEUN_STEPS, VALIDATION_FILE  # noqa: E402

#----------------------------------------------------------------------------
# The study. A configuration is a list of train_edm2.py options on top of the cd-tiny-img16 preset
# with S = 4 and BASELINE, the options that preset had before this study chose its recipe; 'reference'
# uses the EDM MSCD reference's defaults for the teacher grid and its anneal.

TARGET_RATIO = 1.10  # "at teacher quality": FD within 10 % of the teacher's Heun FD

SETTINGS = {
    'full': dnnlib.EasyDict(duration='8Ki', long_duration='24Ki', snapshot='1Ki', seeds=[0], top_seeds=[0, 1, 2], top=2,
        phema_stds=[0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2], steps_sweep=[1, 2, 4, 8]),
    'quick': dnnlib.EasyDict(duration='1Ki', long_duration='2Ki', snapshot='1Ki', seeds=[0], top_seeds=[0, 1], top=1,
        phema_stds=[0.05, 0.1], steps_sweep=[2]),
}

BASELINE = ['--cd_lr=0.002', '--cd_decay=0', '--teacher_solver=heun', '--student_sigma_min=0.002']

CONFIGS = {
    'baseline':          [],
    'reference':         ['--T_start=256', '--T_end=1024', '--T_anneal_kimg=750'],
    'lr-0.001':          ['--cd_lr=0.001'],
    'lr-0.004':          ['--cd_lr=0.004'],
    'lr-0.008':          ['--cd_lr=0.008'],
    'lr-0.004-decay':    ['--cd_lr=0.004', '--cd_decay=64'],
    'batch-64':          ['--batch=64'],
    'T-8-32':            ['--T_start=8', '--T_end=32'],
    'anneal-2k':         ['--T_anneal_kimg=2'],
    'sampling-edm':      ['--sampling_mode=edm'],
    'weight-karras':     ['--cd_weight_mode=karras'],
    'loss-l2':           ['--cd_loss=l2'],
    'solver-ddim':       ['--teacher_solver=ddim'],
    'solver-addim':      ['--teacher_solver=addim'],
    'dropout-0.1':       ['--cd_dropout=0.1'],
}
QUICK_CONFIGS = ['baseline', 'lr-0.004', 'solver-ddim']
FIXED = ('baseline', 'reference')  # always seeded: the baselines of the time-to-quality comparison


def combine(screening, limit=3):
    """'combined': the options of the best screened configurations that beat the baseline, one per option."""
    baseline = next((r.late for r in screening if r.name == 'baseline'), float('inf'))
    options = {}
    for r in sorted(screening, key=lambda r: r.late):
        if r.name in FIXED or r.late >= baseline or len(options) >= limit:
            continue
        for arg in CONFIGS[r.name]:
            options.setdefault(arg.split('=')[0], arg)
    return list(options.values())

#----------------------------------------------------------------------------
# Runs and what they measured.

def read_rows(path):
    rows, _bad = plots.read_jsonl(path) if os.path.isfile(path) else ([], 0)
    return rows


def run_config(ws, name, args, seed, s, S=4, duration=None):
    """Distil the workspace's teacher with `args` for `duration` images (default: the setting's); returns the
    run directory (skipped when finished)."""
    duration = duration or s.duration
    suffix = '' if duration == s.duration else f'-{duration}'
    run_dir = os.path.join(ws.outdir, 'runs', f'{name}-S{S}-seed{seed}{suffix}')
    if not os.path.isfile(quickstart.final_snapshot(run_dir, duration)):
        quickstart.run_script('train_edm2.py', f'--outdir={run_dir}', f'--data={ws.paths.dataset}', f'--seed={seed}',
            '--preset=cd-tiny-img16', f'--teacher={ws.paths.teacher}', f'--S={S}', f'--duration={duration}',
            f'--snapshot={s.snapshot}', f'--checkpoint={duration}', f'--status={s.snapshot}',
            f'--val_ref={ws.paths.refs}', f'--val_metrics={quickstart.METRIC}',
            f'--detector={quickstart.METRIC}={ws.paths.detector}', f'--val_num={ws.num_images}', '--val_batch=128',
            '--no_val_heun', f'--val_std={quickstart.EMA_STD}', *BASELINE, *args)  # the last of a repeated option counts
    return run_dir


def fastest_sec_per_kimg(run_dir):
    """The run's fastest status tick in seconds per thousand images (validation is not in it). Times below
    are images x this, so that other load on the machine during some ticks does not count against a recipe."""
    ticks = [row.get('Timing/sec_per_kimg') for row in read_rows(os.path.join(run_dir, 'stats.jsonl'))]
    return min(tick for tick in ticks if tick is not None and np.isfinite(tick))


def summarize(run_dir, name, seed, target, late_count=3):
    """FD_digits of the run's validated snapshots, their mean over the last `late_count` (the ranking: single
    evaluations fluctuate), and when (images, seconds) the run first reached `target`."""
    trained = [row for row in read_rows(os.path.join(run_dir, VALIDATION_FILE)) if row['network'] == 'trained']
    sec_per_kimg = fastest_sec_per_kimg(run_dir)
    reached = next((row for row in trained if row['value'] <= target), None)
    return dnnlib.EasyDict(name=name, seed=seed, final=trained[-1]['value'], best=min(row['value'] for row in trained),
        late=float(np.mean([row['value'] for row in trained[-late_count:]])),
        curve=[(row['nimg'], row['nimg'] / 1e3 * sec_per_kimg, row['value']) for row in trained],
        reached_nimg=None if reached is None else reached['nimg'],
        reached_seconds=None if reached is None else reached['nimg'] / 1e3 * sec_per_kimg, sec_per_kimg=sec_per_kimg)


def fd_of_pickle(ws, pkl, **sampler_kwargs):
    """FD_digits of a network pickle sampled for seeds 0..N-1, as validation and calculate_metrics measure it."""
    batches = generate_images.generate_images(net=pkl, seeds=range(ws.num_images), max_batch_size=128, verbose=False,
        **sampler_kwargs)
    return quickstart.fd_to_reference(quickstart.feature_stats(batches, ws.paths.detector), ws.ref)


def phema_scan(ws, run_dir, s):
    """{std: FD_digits} of post-hoc EMA reconstructions of the run's final snapshot time."""
    outdir = os.path.join(run_dir, 'phema')
    stds = ','.join(str(std) for std in s.phema_stds)
    quickstart.run_script('reconstruct_phema.py', f'--indir={run_dir}', f'--outdir={outdir}', f'--outstd={stds}', '--skip')
    kimg = ImageCount().convert(s.duration, None, None) // 1000
    return {std: fd_of_pickle(ws, os.path.join(outdir, f'phema-{kimg:07d}-{std:.3f}.pkl')) for std in s.phema_stds}

#----------------------------------------------------------------------------
# The workspace: the quick start's data, detector, reference statistics and teacher.

def prepare_workspace(outdir, quick, seed=0):
    c = dnnlib.EasyDict(quickstart.CONFIGS['quick' if quick else 'full'])
    paths = dnnlib.EasyDict(outdir=outdir, dataset=os.path.join(outdir, 'digits-16.zip'),
        detector=os.path.join(outdir, 'digit-features.pkl'), refs=os.path.join(outdir, 'refs-digits.pkl'),
        teacher_dir=os.path.join(outdir, 'teacher'))
    paths.teacher = quickstart.final_snapshot(paths.teacher_dir, c.teacher_duration)
    os.makedirs(outdir, exist_ok=True)
    timings = []
    size_args = [f'--max-images={c.max_images}'] if c.max_images else []
    quickstart.run_stage(timings, 'dataset', paths.dataset, lambda: quickstart.run_script('dataset_tool.py', 'convert',
        '--source=sklearn-digits', f'--dest={paths.dataset}', '--resolution=16x16', *size_args))
    images, labels, num_classes = quickstart.load_labelled_images(paths.dataset)
    train_idx, held_out_idx = quickstart.split_held_out(len(images), seed=seed)
    quickstart.run_stage(timings, 'digit classifier', paths.detector, lambda: quickstart.fit_classifier(paths, images,
        labels, num_classes, train_idx, held_out_idx, c.classifier_epochs, seed))
    quickstart.run_stage(timings, 'reference statistics', paths.refs,
        lambda: quickstart.compute_reference(paths, images[train_idx], c.batch))
    num_images = len(held_out_idx)
    quickstart.run_stage(timings, 'teacher', paths.teacher, lambda: quickstart.run_script('train_edm2.py',
        f'--outdir={paths.teacher_dir}', f'--data={paths.dataset}', f'--seed={seed}', f'--status={c.status}',
        '--preset=tiny-img16', f'--duration={c.teacher_duration}', f'--snapshot={c.teacher_duration}',
        f'--checkpoint={c.teacher_duration}', f'--val_ref={paths.refs}', f'--val_metrics={quickstart.METRIC}',
        f'--detector={quickstart.METRIC}={paths.detector}', f'--val_num={num_images}', f'--val_batch={c.batch}',
        f'--val_std={quickstart.EMA_STD}'))
    teacher_heun = quickstart.validation_row(quickstart.read_validation(paths.teacher_dir), 'trained', 'heun',
        HEUN_STEPS)['value']
    return dnnlib.EasyDict(outdir=outdir, paths=paths, num_images=num_images, teacher_heun=teacher_heun,
        ref=calculate_metrics.load_stats(paths.refs, verbose=False))

#----------------------------------------------------------------------------
# Report.

def _seconds(value):
    return '-' if value is None else dnnlib.util.format_time(value)


def results_table(results, target):
    lines = [f'| configuration | seed | FD_digits final | last 3 (mean) | best | images to FD <= {target:.2f} '
             '| training time to it | s/kimg |', '|---|---:|---:|---:|---:|---:|---:|---:|']
    for r in results:
        images = '-' if r.reached_nimg is None else f'{r.reached_nimg // 1024}Ki'
        lines.append(f'| {r.name} | {r.seed} | {r.final:.2f} | {r.late:.2f} | {r.best:.2f} | {images} | {_seconds(r.reached_seconds)} '
            f'| {r.sec_per_kimg:.1f} |')
    return '\n'.join(lines)


def grouped(results):
    """{configuration: (mean late FD, spread (max - min) of late FD, [results])}."""
    groups = {}
    for r in results:
        groups.setdefault(r.name, []).append(r)
    return {name: (float(np.mean([r.late for r in rs])), float(np.ptp([r.late for r in rs])), rs)
        for name, rs in groups.items()}


def plot_curves(results, path, x, xlabel):
    curves = [(f'{r.name} (seed {r.seed})', [p[x] for p in r.curve if p[x] is not None],
        [p[2] for p in r.curve if p[x] is not None]) for r in results]
    plots.draw_curves([('FD_digits', curves)], path, title='student FD_digits during distillation (S = 4)', xlabel=xlabel)


def threshold_table(groups, teacher_fd, ratios=(1.1, 1.2, 1.3, 1.4)):
    """Training images until FD_digits first falls to ratio x the teacher's Heun FD, mean over the runs that
    got there (how many did in brackets), for each (configuration, (_, _, runs)) in `groups`."""
    lines = ['| configuration | ' + ' | '.join(f'FD <= {r:.2f} x teacher ({r * teacher_fd:.1f})' for r in ratios) + ' |',
             '|---|' + '---:|' * len(ratios)]
    for name, (_mean, _spread, rs) in groups:
        cells = []
        for ratio in ratios:
            reached = [next((nimg for nimg, _sec, fd in r.curve if fd <= ratio * teacher_fd), None) for r in rs]
            reached = [nimg for nimg in reached if nimg is not None]
            cells.append(f'{np.mean(reached) / 1024:.1f}Ki ({len(reached)}/{len(rs)})' if reached else f'- (0/{len(rs)})')
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def write_report(ws, s, screening, seeded, phema, sweep, best_name, long_runs):
    target = TARGET_RATIO * ws.teacher_heun
    stats = grouped(seeded)
    lines = [f'# Recipe study\n\nTeacher Heun ({HEUN_STEPS} steps) FD_digits: {ws.teacher_heun:.2f}; target '
        f'{TARGET_RATIO:.2f} x = {target:.2f}. Each run: {s.duration} images, validated every {s.snapshot}. Training '
        'times are images x the run\'s fastest status tick (s/kimg), so that other load on the machine does not '
        'count against a recipe; validation is not included.\n',
        '## Screening (one seed each)\n', results_table(screening, target),
        '\n## Best configurations over seeds\n', '| configuration | mean FD (last 3 evaluations) | spread | runs |', '|---|---:|---:|---:|']
    lines += [f'| {name} | {mean:.2f} | {spread:.2f} | {len(rs)} |' for name, (mean, spread, rs) in stats.items()]
    lines += ['\n## Time to FD <= target (training time; seeds that never reached it count as not reached)\n',
        '| configuration | runs that reached it | mean training time to it | mean images to it |', '|---|---:|---:|---:|']
    for name, (_mean, _spread, rs) in stats.items():
        reached = [r for r in rs if r.reached_seconds is not None]
        mean_time = _seconds(float(np.mean([r.reached_seconds for r in reached]))) if reached else '-'
        mean_images = f'{np.mean([r.reached_nimg for r in reached]) / 1024:.1f}Ki' if reached else '-'
        lines.append(f'| {name} | {len(reached)}/{len(rs)} | {mean_time} | {mean_images} |')
    if long_runs:
        lines += [f'\nRun for {s.long_duration} images:\n', results_table(long_runs, target)]
    lines += ['\n' + threshold_table(list(stats.items()) + [(r.name, (None, None, [r])) for r in long_runs], ws.teacher_heun)]
    lines += [f'\n## Configurations (train_edm2.py options on top of --preset=cd-tiny-img16 --S=4 {" ".join(BASELINE)})\n',
        '| configuration | options |', '|---|---|']
    lines += [f'| {name} | {" ".join(CONFIGS[name]) or "(none)"} |' for name in dict.fromkeys(r.name for r in screening)]
    lines += ['\n' + results_table(seeded, target), f'\n## Post-hoc EMA of {best_name}\n', '| std | FD_digits |', '|---:|---:|']
    lines += [f'| {std:.3f} | {fd:.2f} |' for std, fd in phema.items()]
    lines += [f'\n## {best_name} at other S\n', '| S | student FD_digits | teacher Euler at S |', '|---:|---:|---:|']
    lines += [f'| {S} | {fd:.2f} | {euler:.2f} |' for S, (fd, euler) in sweep.items()]
    lines += ['\nFigures: fd-vs-images.png, fd-vs-time.png.\n']
    quickstart.write_json(os.path.join(ws.outdir, 'study.json'), dict(teacher_heun=ws.teacher_heun, target=target,
        screening=screening, seeded=seeded, phema={str(k): v for k, v in phema.items()},
        sweep={str(k): v for k, v in sweep.items()}, best=best_name, long_runs=long_runs))
    with open(os.path.join(ws.outdir, 'study.md'), 'wt') as f:
        f.write('\n'.join(lines))
    print('\n'.join(lines))

#----------------------------------------------------------------------------

@click.command()
@click.option('--outdir', help='Where the study keeps its runs and report', metavar='DIR', type=str, required=True)
@click.option('--quick', help='A few-minute smoke test of the whole study', is_flag=True)
@click.option('--only', help='Comma-separated configurations to screen [default: all]', metavar='LIST')
@click.option('--long', help='Also run the best recipe and the reference\'s defaults 3x longer', is_flag=True)
def main(outdir, quick, only, long):
    """Screen distillation recipes on the digits example, then seed, EMA and S studies of the best ones."""
    s = SETTINGS['quick' if quick else 'full']
    names = QUICK_CONFIGS if quick else list(CONFIGS)
    if only:
        names = [name.strip() for name in only.split(',')]
        unknown = [name for name in names if name not in CONFIGS]
        if unknown:
            raise click.BadParameter(f'{unknown}: expected names from {list(CONFIGS)}', param_hint='--only')
    ws = prepare_workspace(os.path.abspath(outdir), quick)
    target = TARGET_RATIO * ws.teacher_heun

    screening = [summarize(run_config(ws, name, CONFIGS[name], seed, s), name, seed, target)
        for name in names for seed in s.seeds]
    combined = combine(screening)
    if len(combined) > 1:  # one improving option is already a screened configuration
        CONFIGS['combined'] = combined
        screening.append(summarize(run_config(ws, 'combined', combined, s.seeds[0], s), 'combined', s.seeds[0], target))
    # The best few over seeds, next to the baseline and the reference's defaults for the time-to-quality comparison.
    top = [r.name for r in sorted(screening, key=lambda r: r.late) if r.name not in FIXED][:s.top]
    seeded = [summarize(run_config(ws, name, CONFIGS[name], seed, s), name, seed, target)
        for name in top for seed in s.top_seeds]
    seeded += [r for r in screening if r.name in FIXED]  # the baselines keep their one screened seed
    best_name = min((item for item in grouped(seeded).items() if item[0] in top), key=lambda item: item[1][0])[0]
    phema = phema_scan(ws, run_config(ws, best_name, CONFIGS[best_name], s.top_seeds[0], s), s)

    sweep = {}
    for S in s.steps_sweep:
        run_dir = run_config(ws, best_name, CONFIGS[best_name], s.top_seeds[0], s, S=S)
        student = quickstart.final_snapshot(run_dir, s.duration)
        cd = persistence.load_network_pickle(student, what='student')['cd']
        euler = fd_of_pickle(ws, ws.paths.teacher, sampler_fn='euler', num_steps=S, sigma_min=cd['sigma_min'],
            sigma_max=cd['sigma_max'], rho=cd['rho'])
        sweep[S] = (fd_of_pickle(ws, student), euler)

    # The best recipe and the reference's defaults run longer, to find when (if ever) each reaches the target.
    long_runs = [summarize(run_config(ws, name, CONFIGS[name], s.seeds[0], s, duration=s.long_duration),
        f'{name}, {s.long_duration}', s.seeds[0], target) for name in dict.fromkeys([best_name, 'reference'])
        if name in CONFIGS and (name == best_name or name in names)] if long else []

    plot_curves(seeded + long_runs, os.path.join(ws.outdir, 'fd-vs-images.png'), x=0, xlabel='training images')
    plot_curves(seeded + long_runs, os.path.join(ws.outdir, 'fd-vs-time.png'), x=1, xlabel='training seconds (2 CPU cores)')
    write_report(ws, s, screening, seeded, phema, sweep, best_name, long_runs)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
