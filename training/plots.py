"""Curves of a run directory as PNG files (matplotlib, Agg backend, nothing is displayed).

    python3 -m training.plots RUN_DIR [--outdir=DIR] [--kimg-min=KIMG]

writes into DIR (default RUN_DIR/plots):

  loss.png        Loss/loss, Loss/grad_norm and Loss/learning_rate against kimg (stats.jsonl), one panel
                  each; status intervals with NaN/Inf steps (Loss/nonfinite_step > 0) are marked in red.
  cd.png          only for runs that report CD/... diagnostics: the timestep counts T_target/T_edges,
                  the edge-class fractions CD/frac_*, the gains CD/gain_* and the errors CD/l2_error_*.
  validation.png  only when metrics-val.jsonl exists: one panel per metric with the trained network
                  against kimg, its best value marked, and every baseline (e.g. the teacher) as a
                  labelled horizontal line.

plot_quality_vs_steps() draws quality against the number of network evaluations (student vs. teacher
samplers); quickstart.py uses it. Every plotting function returns how many points each of its lines
holds, {panel: {line label: points}}, as drawn, which the tests compare with the input files.
"""

import json
import math
import os
import sys

import click

import dnnlib
from torch_utils import distributed as dist

STATS_FILE = 'stats.jsonl'
VALIDATION_FILE = 'metrics-val.jsonl'  # training.monitoring.VALIDATION_FILE (not imported: it pulls in the samplers)
KIMG = 'Progress/kimg'
LOSS_PANELS = ['Loss/loss', 'Loss/grad_norm', 'Loss/learning_rate']
CD_GROUPS = [  # (panel title, name prefix) of the CD/... diagnostics that cd.png draws
    ('timesteps: T_target, T_edges', 'CD/T_'),
    ('edge-class fractions', 'CD/frac_'),
    ('gains', 'CD/gain_'),
    ('L2 error per edge class', 'CD/l2_error_'),
]
DPI = 100
PANEL_SIZE = (7.0, 3.0)  # inches per panel (width, height)

#----------------------------------------------------------------------------
# Reading the run's files.

def read_jsonl(path):
    """The JSON objects of a .jsonl file, one per line, and how many lines could not be read (e.g. a
    line cut short when the run was killed). Bare NaN/Infinity values are read as floats."""
    rows, bad = [], 0
    with open(path, encoding='utf-8') as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def _number(value):
    """value as a finite float, or None (missing, NaN, Inf, not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def series(rows, name, x=KIMG, kimg_min=None):
    """([x], [y]) of the rows where both `x` and `name` are finite numbers and x >= kimg_min."""
    xs, ys = [], []
    for row in rows:
        xv, yv = _number(row.get(x)), _number(row.get(name))
        if xv is None or yv is None or (kimg_min is not None and xv < kimg_min):
            continue
        xs.append(xv)
        ys.append(yv)
    return xs, ys


def stat_names(rows, prefix):
    """The names starting with `prefix` in the rows, in the order they first appear."""
    names = {}
    for row in rows:
        for name in row:
            if name.startswith(prefix):
                names.setdefault(name, None)
    return list(names)

#----------------------------------------------------------------------------
# Drawing.

def _figure(num_panels, ncols=None, panel_size=PANEL_SIZE):
    """A matplotlib Figure on an Agg canvas with `num_panels` axes in a grid, and the list of axes."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise dnnlib.UserError('plotting needs matplotlib: python3 -m pip install -r requirements.txt') from None
    ncols = ncols or (1 if num_panels <= 3 else 2)
    nrows = max(1, math.ceil(num_panels / ncols))
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout='constrained')
    FigureCanvasAgg(fig)  # attaches itself to fig: PNG rendering without any GUI or pyplot state
    axes = [fig.add_subplot(nrows, ncols, idx + 1) for idx in range(max(num_panels, 1))]
    return fig, axes


def _save(fig, path):
    dist.write_file_atomically(path, lambda f: fig.savefig(f, format='png', dpi=DPI))
    return path


def _line(ax, xs, ys, label, **kwargs):
    """Draw one curve (with dots when it has few points, so that a single point shows); returns its length."""
    if len(xs) <= 40:
        kwargs.setdefault('marker', 'o')
        kwargs.setdefault('markersize', 3)
    (line,) = ax.plot(xs, ys, label=label, **kwargs)
    return len(line.get_xdata())


def _auto_log_y(ax, values):
    """Log scale when all values are positive and span more than a factor of 30."""
    if values and min(values) > 0 and max(values) / min(values) > 30:
        ax.set_yscale('log')


def _finish(ax, title, xlabel, ylabel=None, legend=True):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if not any(len(line.get_xdata()) for line in ax.lines):
        ax.text(0.5, 0.5, 'no finite values', transform=ax.transAxes, ha='center', va='center', color='gray')
    elif legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def draw_curves(panels, path, title, xlabel='kimg'):
    """panels: [(panel title, [(label, xs, ys)])], one axes each, written to `path`; returns the counts."""
    fig, axes = _figure(len(panels))
    counts = {}
    for ax, (panel, curves) in zip(axes, panels):
        counts[panel] = {label: _line(ax, xs, ys, label) for label, xs, ys in curves}
        _auto_log_y(ax, [y for _label, _xs, ys in curves for y in ys])
        _finish(ax, panel, xlabel, legend=len(curves) > 1)
    fig.suptitle(title, fontsize=11)
    _save(fig, path)
    return counts

#----------------------------------------------------------------------------
# The three plots of a run directory.

def plot_loss(rows, path, kimg_min=None, title='training loss'):
    """loss.png: the LOSS_PANELS against kimg, and the status intervals that had NaN/Inf steps."""
    bad_ticks, _ = series([row for row in rows if (_number(row.get('Loss/nonfinite_step')) or 0) > 0],
        'Loss/nonfinite_step', kimg_min=kimg_min)
    fig, axes = _figure(len(LOSS_PANELS))
    counts = {}
    for ax, name in zip(axes, LOSS_PANELS):
        xs, ys = series(rows, name, kimg_min=kimg_min)
        counts[name] = {name: _line(ax, xs, ys, name)}
        if name == 'Loss/grad_norm':
            _auto_log_y(ax, ys)
        for idx, kimg in enumerate(bad_ticks):
            ax.axvline(kimg, color='tab:red', alpha=0.4, linewidth=1, label='NaN/Inf steps' if idx == 0 else None)
        if bad_ticks:
            counts[name]['NaN/Inf steps'] = len(bad_ticks)
        _finish(ax, name, 'kimg', legend=bool(bad_ticks))
    fig.suptitle(title, fontsize=11)
    _save(fig, path)
    return counts


def plot_cd(rows, path, kimg_min=None, title='consistency distillation diagnostics'):
    """cd.png: one panel per CD_GROUPS entry that the rows hold; None (nothing written) without any."""
    panels = []
    for panel, prefix in CD_GROUPS:
        names = stat_names(rows, prefix)
        if names:
            panels.append((panel, [(name[len('CD/'):], *series(rows, name, kimg_min=kimg_min)) for name in names]))
    if not panels:
        return None
    return draw_curves(panels, path, title)


def baseline_label(row):
    """'teacher heun 63 NFE' for a metrics-val.jsonl row."""
    return f'{row.get("network")} {row.get("sampler")} {row.get("nfe")} NFE'


def _row_kimg(row):
    kimg = _number(row.get('kimg'))
    if kimg is None and _number(row.get('nimg')) is not None:
        kimg = row['nimg'] / 1e3
    return kimg


def plot_validation(rows, path, kimg_min=None, title='validation'):
    """validation.png from metrics-val.jsonl rows: per metric, the trained network against kimg (one line
    per sampler setting, lowest value marked) and each baseline as a horizontal line. Lower is better,
    as for FID and FD_DINOv2. None (nothing written) when no row has a metric and a finite value."""
    metrics = {}
    for row in rows:
        if isinstance(row.get('metric'), str) and _number(row.get('value')) is not None:
            metrics.setdefault(row['metric'], []).append(row)
    if not metrics:
        return None
    fig, axes = _figure(len(metrics))
    counts = {}
    for ax, (metric, metric_rows) in zip(axes, metrics.items()):
        counts[metric] = {}
        trained, baselines = {}, {}
        for row in metric_rows:
            if row.get('network') == 'trained':
                kimg = _row_kimg(row)
                if kimg is not None and (kimg_min is None or kimg >= kimg_min):
                    trained.setdefault(f'trained {row.get("sampler")} {row.get("nfe")} NFE', []).append((kimg, row['value']))
            else:
                baselines[baseline_label(row)] = float(row['value'])  # a later row of the same baseline wins
        for label, points in trained.items():
            points.sort()
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            counts[metric][label] = _line(ax, xs, ys, label)
            best = min(range(len(ys)), key=lambda idx: ys[idx])
            ax.plot([xs[best]], [ys[best]], linestyle='none', marker='*', markersize=12, color='gold',
                markeredgecolor='black', label=f'best {ys[best]:.4g} at {xs[best]:g} kimg', zorder=5)
        styles = ['--', ':', '-.', (0, (5, 1, 1, 1))]
        for idx, (label, value) in enumerate(baselines.items()):
            ax.axhline(value, linestyle=styles[idx % len(styles)], color=f'C{(idx + 1) % 10}',
                label=f'{label}: {value:.4g}')
            counts[metric][label] = 1
        _finish(ax, metric, 'kimg', ylabel=metric)
    fig.suptitle(title, fontsize=11)
    _save(fig, path)
    return counts


def plot_quality_vs_steps(rows, path, metric_name, title=None):
    """Draw a quality metric against the number of network evaluations and write it as a PNG.

    rows:        dicts with keys 'name' (one line per name, in the order names first appear), 'nfe'
                 (network evaluations per image) and 'value' (the metric); rows whose nfe or value is
                 not a finite number are left out, e.g.
                 [dict(name='student', nfe=1, value=9.1), dict(name='student', nfe=2, value=6.0), ...,
                  dict(name='teacher euler', nfe=4, value=30.2), dict(name='teacher heun', nfe=7, value=8.3)]
    path:        the PNG file to write (its folder is created); written atomically.
    metric_name: the y-axis label, e.g. 'fid' or 'classifier error'.
    title:       the figure title (default: '<metric_name> vs. network evaluations').

    The x axis is logarithmic (base 2), with a tick at every NFE that occurs. Returns {name: number of
    points drawn}.
    """
    lines = {}
    for row in rows:
        nfe, value = _number(row.get('nfe')), _number(row.get('value'))
        if nfe is not None and nfe > 0 and value is not None:
            lines.setdefault(str(row.get('name')), []).append((nfe, value))
        else:
            lines.setdefault(str(row.get('name')), [])
    fig, (ax,) = _figure(1, panel_size=(7.0, 4.5))
    counts = {}
    for name, points in lines.items():
        points.sort()
        counts[name] = _line(ax, [p[0] for p in points], [p[1] for p in points], name, marker='o', markersize=5)
    ticks = sorted({p[0] for points in lines.values() for p in points})
    if ticks:
        ax.set_xscale('log', base=2)
        ax.set_xticks(ticks, [f'{tick:g}' for tick in ticks])
        ax.minorticks_off()
    _auto_log_y(ax, [p[1] for points in lines.values() for p in points])
    _finish(ax, title or f'{metric_name} vs. network evaluations', 'network evaluations per image (NFE)',
        ylabel=metric_name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _save(fig, path)
    return counts


def plot_run(run_dir, outdir=None, kimg_min=None):
    """Write the plots of `run_dir` into `outdir` (default run_dir/plots): loss.png always, cd.png and
    validation.png when the run has what they show. Returns {path written: counts of that plot}."""
    if not os.path.isdir(run_dir):
        raise dnnlib.UserError(f'RUN_DIR: {run_dir} ' + ('is not a directory' if os.path.exists(run_dir) else 'does not exist'))
    stats_path = os.path.join(run_dir, STATS_FILE)
    if not os.path.isfile(stats_path):
        raise dnnlib.UserError(f'RUN_DIR: {run_dir} has no {STATS_FILE}; is it a train_edm2.py run directory?')
    try:
        rows, bad = read_jsonl(stats_path)
        val_path = os.path.join(run_dir, VALIDATION_FILE)
        val_rows, val_bad = read_jsonl(val_path) if os.path.isfile(val_path) else (None, 0)
    except (OSError, UnicodeDecodeError) as err:
        raise dnnlib.UserError(f'RUN_DIR: cannot read {stats_path}: {err}') from None
    for path, count in [(stats_path, bad), (val_path, val_bad)]:
        if count:
            print(f'Note: left out {count} line(s) of {path} that are not JSON objects (e.g. cut short by a kill)',
                file=sys.stderr)
    outdir = outdir if outdir is not None else os.path.join(run_dir, 'plots')
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as err:
        raise dnnlib.UserError(f'--outdir: cannot create {outdir} ({err.strerror or err})') from None
    name = os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
    written = {}
    path = os.path.join(outdir, 'loss.png')
    written[path] = plot_loss(rows, path, kimg_min=kimg_min, title=f'{name}: training loss')
    if stat_names(rows, 'CD/'):
        path = os.path.join(outdir, 'cd.png')
        counts = plot_cd(rows, path, kimg_min=kimg_min, title=f'{name}: consistency distillation diagnostics')
        if counts is not None:
            written[path] = counts
    if val_rows is not None:
        path = os.path.join(outdir, 'validation.png')
        counts = plot_validation(val_rows, path, kimg_min=kimg_min, title=f'{name}: validation ({VALIDATION_FILE})')
        if counts is not None:
            written[path] = counts
    return written

#----------------------------------------------------------------------------

@click.command()
@click.argument('run_dir', metavar='RUN_DIR', type=str)
@click.option('--outdir', help='Folder for the PNG files  [default: RUN_DIR/plots]', metavar='DIR', type=str, default=None)
@click.option('--kimg-min', 'kimg_min', help='Leave out the points before this training time', metavar='KIMG',
    type=click.FloatRange(min=0), default=None)
def cmdline(run_dir, outdir, kimg_min):
    """Draw the curves of a train_edm2.py run directory into PNG files.

    Writes loss.png (loss, gradient norm, learning rate), cd.png (the CD/... diagnostics of
    distillation runs) and validation.png (metrics-val.jsonl, with the baselines), the last two only
    when the run has them.

    Example: python3 -m training.plots runs/student --kimg-min=1
    """
    try:
        written = plot_run(run_dir, outdir=outdir, kimg_min=kimg_min)
    except ValueError as err:  # dnnlib.UserError included
        raise click.ClickException(str(err)) from None
    for path in written:
        print(path)


if __name__ == '__main__':
    cmdline()
