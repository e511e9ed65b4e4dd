"""Built-in end-to-end example that runs on a few CPU cores.

Builds the scikit-learn digits dataset and trains a small digit classifier on 75 % of it
(training/digit_features.py). The classifier's penultimate features are the FD_digits metric, used
through calculate_metrics as any feature network given as a file (`--detector fd_digits=PKL`):
the reference statistics of the training-split digits are computed as `calculate_metrics.py ref`
computes them. The teacher (EDM2) trains, then the S-step student (consistency distillation) trains
with validation on, so that its metrics-val.jsonl holds the student and the teacher's S-step Euler
baseline; with 2 steps it starts from a 4-step student, distilled first. The teacher and the
student are then sampled at several step counts, in-process with generate_images and measured with
calculate_metrics' code (as validation measures), for the teacher's Heun row, a quality-vs-steps figure
and the classifier's confidence and class agreement. Writes sample grids, the run curves
(training.plots), the figure and results.md with the table. Rerunning with the same --outdir skips
finished stages (refusing a finished student of other steps) and resumes unfinished training.
"""

import json
import os
import pickle
import shlex
import subprocess
import sys
import time

import click
import numpy as np
import torch

import calculate_metrics
import dnnlib
import generate_images
from torch_utils import distributed as dist
from torch_utils import persistence
import train_edm2
from train_edm2 import ImageCount
from training import digit_features, plots
from training.dataset import ImageFolderDataset
from training.monitoring import HEUN_STEPS, VALIDATION_FILE, sampler_nfe

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))

#----------------------------------------------------------------------------
# Configurations. Durations are image counts in train_edm2.py's syntax. The step lists are what
# quality-vs-steps.png shows: the teacher with Euler and with Heun, and the student besides its own S.

CONFIGS = {
    'full': dnnlib.EasyDict(max_images=None, teacher_duration='32Ki', student_duration='20Ki', status='2Ki',
        start_steps=4, chained_steps=[2], few_step_duration='64Ki', cd_options=[], classifier_epochs=10, batch=128,
        euler_steps=[1, 2, 4, 8, 16], heun_steps=[2, 4, 8, 16, 32], student_steps=[1, 2, 8], seed_sets=3),
    'quick': dnnlib.EasyDict(max_images=200, teacher_duration='1Ki', student_duration='1Ki', status='1Ki',
        start_steps=4, chained_steps=[2], few_step_duration='1Ki', cd_options=['--T_start=8', '--T_end=8', '--T_anneal_kimg=0'],
        classifier_epochs=5, batch=128, euler_steps=[1], heun_steps=[2], student_steps=[1], seed_sets=2),
}
# chained_steps: students of these steps start from a student of start_steps steps (trained first, for
# student_duration images) and train for few_step_duration; from the teacher the 2-step student levels off
# further from it, while the 1-step student does far worse from the 4-step one (docs/results.md, the 2-step
# student).
# seed_sets: the student and the teacher's Heun are compared on this many disjoint sets of N seeds (N = the
# number of held-out digits); one set of 449 samples moves their FD ratio by a few per cent.
EMA_STD = '0.100'   # the post-hoc EMA profile taken from both training runs (and validated)
HELD_OUT_FRACTION = 0.25
METRIC = 'fd_digits'

#----------------------------------------------------------------------------
# Data and the digit classifier.

def load_labelled_images(dataset_path):
    """uint8 images [N,C,H,W], integer class labels [N] and the number of classes of a labelled dataset."""
    dataset = ImageFolderDataset(dataset_path, use_labels=True)
    if not dataset.has_labels:
        raise click.ClickException(f'{dataset_path} has no class labels; the digit classifier needs them')
    items = [dataset[i] for i in range(len(dataset))]
    return np.stack([image for image, _ in items]), np.array([onehot.argmax() for _, onehot in items]), dataset.label_dim


def split_held_out(num_items, held_out_fraction=HELD_OUT_FRACTION, seed=0):
    """Random (train, held-out) index arrays; the same seed gives the same split."""
    order = np.random.RandomState(seed).permutation(num_items)
    num_held_out = max(int(round(num_items * held_out_fraction)), 1)
    return np.sort(order[num_held_out:]), np.sort(order[:num_held_out])


@torch.no_grad()
def class_probabilities(net, images, batch_size=256):
    """The classifier's class probabilities [N,K] (float64, numpy) for uint8 images [N,C,H,W]."""
    device = next(net.parameters()).device
    probs = [net.class_probabilities(batch.to(device)).double().cpu() for batch in torch.as_tensor(np.asarray(images)).split(batch_size)]
    return torch.cat(probs).numpy()


def mean_confidence(probs):
    """Mean over images of the classifier's top-class probability."""
    return float(probs.max(axis=1).mean())


def class_agreement(probs, classes):
    """Fraction of images that the classifier assigns to the given classes."""
    return float((probs.argmax(axis=1) == np.asarray(classes)).mean())


def image_batches(images, batch_size):
    """uint8 images [N,C,H,W] as a list of tensor batches, the input calculate_stats_for_iterable takes."""
    return list(torch.as_tensor(np.asarray(images)).split(batch_size))


def feature_stats(batches, detector_path):
    """FD_digits feature statistics of image batches, by calculate_metrics (as `calculate_metrics.py ref` and
    validation compute them)."""
    stats = None
    for r in calculate_metrics.calculate_stats_for_iterable(batches, metrics=[METRIC], verbose=False,
            detector_sources={METRIC: detector_path}):
        stats = r.stats if r.stats is not None else stats
    return stats


def fd_to_reference(stats, ref):
    return calculate_metrics.calculate_metrics_from_stats(stats, ref, [METRIC], verbose=False)[METRIC]


def load_classifier(detector_path):
    """The digit classifier behind the fd_digits detector: the very module that calculate_metrics loaded."""
    return calculate_metrics.get_detector(METRIC, verbose=False, source=detector_path).model

#----------------------------------------------------------------------------
# Stages.

def run_script(script, *args):
    """Run one of the repository's scripts as a subprocess with its output streaming through."""
    command = [sys.executable, os.path.join(REPO_ROOT, script), *args]
    print('$ ' + shlex.join(command), flush=True)
    status = subprocess.run(command, cwd=REPO_ROOT).returncode
    if status != 0:
        raise click.ClickException(f'{script} exited with status {status}; the command was: {shlex.join(command)}')


def run_stage(timings, name, output_path, action):
    """Run `action` unless `output_path` exists already; print and record how long it took."""
    print(f'\n=== {name} ===', flush=True)
    if os.path.exists(output_path):
        print(f'{output_path} exists; skipping.', flush=True)
        timings.append((name, None))
        return
    start = time.time()
    action()
    if not os.path.exists(output_path):
        raise click.ClickException(f'stage "{name}" finished without writing {output_path}')
    timings.append((name, time.time() - start))
    print(f'{name}: done in {dnnlib.util.format_time(timings[-1][1])}', flush=True)


def final_snapshot(run_dir, duration):
    """Path of the last network snapshot that train_edm2.py writes for a run of `duration` images."""
    nimg = ImageCount().convert(duration, None, None)
    return os.path.join(run_dir, f'network-snapshot-{nimg // 1000:07d}-{EMA_STD}.pkl')


def write_json(path, obj):
    dist.write_file_atomically(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def fit_classifier(paths, images, labels, num_classes, train_idx, held_out_idx, epochs, seed):
    """Train the digit classifier on the training split and pickle it as the fd_digits detector."""
    net = digit_features.train_digit_classifier(images[train_idx], labels[train_idx], num_classes=num_classes,
        epochs=epochs, seed=seed)
    probs = class_probabilities(net, images[held_out_idx])
    print(f'Digit classifier: {class_agreement(probs, labels[held_out_idx]):.1%} accuracy on {len(held_out_idx)} '
          'held-out images', flush=True)
    dist.write_file_atomically(paths.detector, lambda f: pickle.dump(net, f))


def compute_reference(paths, images, batch_size):
    """Reference statistics of the given (training-split) digits, by the functions behind `calculate_metrics.py ref`."""
    stats = feature_stats(image_batches(images, batch_size), paths.detector)
    calculate_metrics.save_stats(stats, paths.refs)


def first_teacher_edges(c):
    """The student's T_start: the configuration's own, else the cd-tiny-img16 preset's."""
    given = [option.split('=', 1)[1] for option in c.cd_options if option.startswith('--T_start=')]
    return int(given[-1]) if given else train_edm2.PRESETS['cd-tiny-img16']['T_start']


def student_stages(c, S, run_dirs):
    """The distillation runs, in order: EasyDicts of S, duration, run_dir and snapshot. The last one is the
    S-step student; one of c.chained_steps steps starts from a c.start_steps-step student."""
    chained = S in c.chained_steps
    stages = [dnnlib.EasyDict(S=c.start_steps, duration=c.student_duration, run_dir=run_dirs.start)] if chained else []
    stages.append(dnnlib.EasyDict(S=S, duration=c.few_step_duration if chained else c.student_duration,
        run_dir=run_dirs.final))
    for stage in stages:
        stage.snapshot = final_snapshot(stage.run_dir, stage.duration)
    return stages


def check_finished_student(stage, init_pkl):
    """A stage whose snapshot exists is skipped: refuse when its run distilled another student."""
    if not os.path.exists(stage.snapshot):
        return
    with open(os.path.join(stage.run_dir, 'training_options.json')) as f:
        recorded = json.load(f)['loss_kwargs']
    if (recorded.get('S'), recorded.get('init_pkl')) != (stage.S, init_pkl):
        raise click.ClickException(f'{stage.run_dir} holds a {recorded.get("S")}-step student started from '
            f'{recorded.get("init_pkl") or "the teacher"}, not the {stage.S}-step student started from '
            f'{init_pkl or "the teacher"} that this run needs; use another --outdir')


def train_models(paths, c, stages, seed, num_val, timings):
    """Teacher (plain EDM2 training), then the students distilled from it (CD mode, each stage starting from
    the one before, the first from the teacher). The last, the S-step student, is validated on FD_digits at
    its final snapshot (the only one it writes). The teacher is not validated: its Heun row comes from
    sample_all(), which samples it anyway and would repeat the same images."""
    common = [f'--data={paths.dataset}', f'--seed={seed}', f'--status={c.status}']
    validation = [f'--val_ref={paths.refs}', f'--val_metrics={METRIC}', f'--detector={METRIC}={paths.detector}',
        f'--val_num={num_val}', f'--val_batch={c.batch}', f'--val_std={EMA_STD}', '--val_every=1']
    run_stage(timings, 'teacher', paths.teacher, lambda: run_script('train_edm2.py', f'--outdir={paths.teacher_dir}',
        *common, '--preset=tiny-img16', f'--duration={c.teacher_duration}', f'--snapshot={c.teacher_duration}',
        f'--checkpoint={c.teacher_duration}'))
    init_pkl = None
    for stage in stages:
        check_finished_student(stage, init_pkl)
        init = [] if init_pkl is None else [f'--init={init_pkl}']
        validated = validation + ['--no_val_heun'] if stage is stages[-1] else []  # sample_all() measures the teacher's Heun
        run_stage(timings, f'student (S={stage.S})', stage.snapshot, lambda: run_script('train_edm2.py',
            f'--outdir={stage.run_dir}', *common, '--preset=cd-tiny-img16', f'--teacher={paths.teacher}', *init,
            f'--S={stage.S}', *c.cd_options, f'--duration={stage.duration}', f'--snapshot={stage.duration}',
            f'--checkpoint={stage.duration}', *validated))
        init_pkl = stage.snapshot

#----------------------------------------------------------------------------
# Validation rows and sampled points.

def read_validation(run_dir):
    path = os.path.join(run_dir, VALIDATION_FILE)
    if not os.path.isfile(path):
        raise click.ClickException(f'{path} is missing: the run was trained without validation (by an older quickstart?); '
            f'delete {run_dir} and rerun')
    rows, _bad = plots.read_jsonl(path)
    return rows


def validation_row(rows, network, sampler, steps, snapshot=None, where=''):
    """The last FD_digits row of metrics-val.jsonl for a network (and snapshot) sampled with sampler/steps."""
    found = [row for row in rows if row.get('metric') == METRIC and row.get('network') == network
             and row.get('sampler') == sampler and row.get('steps') == steps
             and (snapshot is None or row.get('snapshot') == snapshot)]
    if not found:
        raise click.ClickException(f'{where}{VALIDATION_FILE} has no {METRIC} row for the {network} network with '
            f'{sampler}, {steps} steps' + (f' at {snapshot}' if snapshot else '') + '; delete that run directory and rerun')
    return found[-1]


def sample_points(c, S):
    """What quality-vs-steps.png shows: EasyDicts of tag, network ('teacher' or 'student'), sampler, steps, nfe
    and name, for the configured step lists plus the validation rows (the teacher's Euler at S and Heun at 32
    steps, the student at S)."""
    points = [(f'teacher-euler{k}', 'teacher', 'euler', k, f'teacher Euler, {steps_text(k)}')
              for k in sorted(set(c.euler_steps) | {S})]
    points += [(f'teacher-heun{k}', 'teacher', 'heun', k, f'teacher Heun, {steps_text(k)}')
               for k in sorted(set(c.heun_steps) | {HEUN_STEPS})]
    points += [(f'student{k}', 'student', 'euler', k, f'student, {steps_text(k)}' + ('' if k == S else
               f' (trained for S={S}: off its grid)')) for k in sorted(set(c.student_steps) | {S})]
    return [dnnlib.EasyDict(tag=tag, network=network, sampler=sampler, steps=steps, nfe=sampler_nfe(sampler, steps),
                            name=name) for tag, network, sampler, steps, name in points]


def steps_text(k):
    return f'{k} step' + ('' if k == 1 else 's')


def figure_rows(points, S):
    """plot_quality_vs_steps() rows: one line each for the teacher's Euler and Heun, the student at every step
    count it was sampled with, and (drawn last, on top) the student at its own S as a point of its own."""
    rows = [dict(name=f'teacher, {p.sampler.capitalize()}', nfe=p.nfe, value=p.value) for p in points if p.network == 'teacher']
    student = [p for p in points if p.network == 'student']
    others = [p.steps for p in student if p.steps != S]
    if others:
        label = f'same student, also at {", ".join(map(str, others))} step{"s" if others != [1] else ""} (off its grid)'
        rows += [dict(name=label, nfe=p.nfe, value=p.value) for p in student]
    rows += [dict(name=f'student, S={S} (its training grid)', nfe=p.nfe, value=p.value) for p in student if p.steps == S]
    return rows


def sampler_kwargs_of(point, student_cd):
    """generate_images() arguments that sample a point as validation does: the teacher's Euler runs on the
    student's grid (sigma_min, sigma_max, rho of its 'cd' entry), the student uses its own."""
    kwargs = dict(sampler_fn=point.sampler, num_steps=point.steps)
    if point.network == 'teacher' and point.sampler == 'euler':
        kwargs.update(sigma_min=student_cd['sigma_min'], sigma_max=student_cd['sigma_max'], rho=student_cd['rho'])
    return kwargs


def sample_and_measure(point, net_path, student_cd, seeds, batch_size, paths, tag):
    """Generate the seeds in-process (generate_images, as validation does), measure FD_digits with
    calculate_metrics and the classifier's confidence and class agreement, write a grid and the numbers
    (samples/grid-TAG.png, samples/TAG.json)."""
    classifier = load_classifier(paths.detector)
    kept = []

    def keeping(batches):
        for r in batches:
            if r.images is not None:
                kept.append((r.images.cpu(), r.labels.argmax(dim=1).cpu()))
            yield r
    batches = generate_images.generate_images(net=net_path, seeds=seeds, max_batch_size=batch_size,
        verbose=False, **sampler_kwargs_of(point, student_cd))
    start = time.time()
    stats = feature_stats(keeping(batches), paths.detector)
    seconds = time.time() - start
    images, classes = torch.cat([k[0] for k in kept]), torch.cat([k[1] for k in kept])
    probs = class_probabilities(classifier, images)
    grid = os.path.join(paths.samples, f'grid-{tag}.png')
    generate_images.save_png(generate_images.image_grid(images.numpy()), grid)
    write_json(os.path.join(paths.samples, f'{tag}.json'), dict(point, seeds=[seeds[0], seeds[-1]], num_images=len(images),
        fd=fd_to_reference(stats, calculate_metrics.load_stats(paths.refs, verbose=False)),
        confidence=mean_confidence(probs), agreement=class_agreement(probs, classes.numpy()),
        grid=os.path.relpath(grid, paths.outdir), seconds=round(seconds, 3)))


def seed_set_tag(point, seeds):
    return point.tag if seeds[0] == 0 else f'{point.tag}-seeds{seeds[0]}'


def sample_all(paths, c, S, num_images, timings):
    """Sample and measure every point on seeds 0..N-1, and the verdict's two (the teacher's Heun and the
    student at S) on the further seed sets as well. Returns the points, each with .seed_sets: the FD_digits
    on each set it was sampled on."""
    student_cd = persistence.load_network_pickle(paths.student, what='student snapshot')['cd']
    points = sample_points(c, S)
    verdict_keys = {('teacher', 'heun', HEUN_STEPS), ('student', 'euler', S)}
    jobs = []
    for p in points:
        sets = c.seed_sets if (p.network, p.sampler, p.steps) in verdict_keys else 1
        jobs += [(p, range(k * num_images, (k + 1) * num_images)) for k in range(sets)]
    for p, seeds in jobs:
        net_path = paths.student if p.network == 'student' else paths.teacher
        tag = seed_set_tag(p, seeds)
        name = p.name if seeds[0] == 0 else f'{p.name}, seeds {seeds[0]}-{seeds[-1]}'
        run_stage(timings, f'samples: {name}', os.path.join(paths.samples, f'{tag}.json'),
            lambda p=p, net_path=net_path, seeds=seeds, tag=tag: sample_and_measure(p, net_path, student_cd, seeds,
                c.batch, paths, tag))
    for p in points:
        p.seed_sets = []
    for p, seeds in jobs:
        measured = read_json(os.path.join(paths.samples, f'{seed_set_tag(p, seeds)}.json'))
        if seeds[0] == 0:
            p.update(measured)
        p.seed_sets.append(dnnlib.EasyDict(seeds=[seeds[0], seeds[-1]], fd=measured['fd']))
    return points


def attach_validation(points, paths, S):
    """Give the points that validation measured their FD_digits value (the one the figure and table show): the
    teacher's Euler baseline and the student's final snapshot of the student run; the others keep the value
    measured in-process. Returns the student run's validation rows."""
    rows = read_validation(paths.student_dir)
    where = f'{paths.student_dir}/'
    measured = {
        ('teacher', 'euler', S): validation_row(rows, 'teacher', 'euler', S, where=where),
        ('student', 'euler', S): validation_row(rows, 'trained', 'euler', S, snapshot=os.path.basename(paths.student),
            where=where)}
    for p in points:
        row = measured.get((p.network, p.sampler, p.steps))
        p.value = p.fd if row is None else row['value']
        p.source = 'in-process' if row is None else f'{os.path.basename(paths.student_dir)}/{VALIDATION_FILE}'
        p.validation = row
    return rows

#----------------------------------------------------------------------------
# Report.

def format_table(rows):
    """Markdown table of quality rows (EasyDicts with name, nfe, num_images, fd, confidence, agreement)."""
    lines = ['| images | NFE | N | FD_digits (lower is better) | confidence | class agreement |',
             '|---|---:|---:|---:|---:|---:|']
    for r in rows:
        agreement = '-' if r.agreement is None else f'{r.agreement:.3f}'
        lines.append(f'| {r.name} | {r.nfe if r.nfe is not None else "-"} | {r.num_images} | {r.fd:.2f} '
                     f'| {r.confidence:.3f} | {agreement} |')
    return '\n'.join(lines)


def table_rows(real, points, S):
    """The real held-out digits, then teacher Heun (32 steps, measured in-process), teacher Euler (S) and
    student (S) (the student run's validation rows, with their FD_digits from metrics-val.jsonl)."""
    wanted = [('teacher', 'heun', HEUN_STEPS), ('teacher', 'euler', S), ('student', 'euler', S)]
    by_key = {(p.network, p.sampler, p.steps): p for p in points}
    rows = [real]
    for key in wanted:
        p = by_key[key]
        rows.append(dnnlib.EasyDict(name=p.name, nfe=p.nfe, num_images=p.num_images, fd=p.value,
            confidence=p.confidence, agreement=p.agreement))
    return rows


def verdict_sets(points, S):
    """EasyDicts of seeds, teacher and student: the FD_digits of the teacher's Heun and of the student at S on
    each seed set; on the first set they are the table's values."""
    by_key = {(p.network, p.sampler, p.steps): p for p in points}
    teacher, student = by_key[('teacher', 'heun', HEUN_STEPS)], by_key[('student', 'euler', S)]
    sets = [dnnlib.EasyDict(seeds=t.seeds, teacher=t.fd, student=s.fd) for t, s in zip(teacher.seed_sets, student.seed_sets)]
    sets[0].update(teacher=teacher.value, student=student.value)
    return sets


def student_verdict(rows, sets):
    """The student's FD_digits as a multiple of the teacher's Heun FD_digits (rows of table_rows()), and, when
    there are several seed sets (verdict_sets()), a second line with the mean ratio over them."""
    teacher, student = rows[1], rows[3]
    line = (f'{student.name}: FD_digits {student.fd:.2f} = {student.fd / teacher.fd:.3f} x that of '
            f'{teacher.name} ({teacher.fd:.2f}), with {student.nfe} instead of {teacher.nfe} network evaluations')
    if len(sets) == 1:
        return line
    ratios = [s.student / s.teacher for s in sets]
    each = '; '.join(f'seeds {s.seeds[0]}-{s.seeds[1]}: {s.student:.2f} / {s.teacher:.2f} = {r:.3f}'
                     for s, r in zip(sets, ratios))
    return (f'{line}\n{student.name}, mean over {len(sets)} sets of {student.num_images} seeds: {np.mean(ratios):.3f} x '
            f"the teacher's FD_digits ({each})")


def format_points(points):
    lines = ['| images | sampler | steps | NFE | FD_digits | from | confidence | class agreement |',
             '|---|---|---:|---:|---:|---|---:|---:|']
    for p in points:
        lines.append(f'| {p.name} | {p.sampler} | {p.steps} | {p.nfe} | {p.value:.2f} | {p.source} | {p.confidence:.3f} '
                     f'| {p.agreement:.3f} |')
    return '\n'.join(lines)


def format_timings(timings):
    lines = ['| stage | time |', '|---|---:|']
    for name, seconds in timings:
        lines.append(f'| {name} | {"skipped (done earlier)" if seconds is None else dnnlib.util.format_time(seconds)} |')
    return '\n'.join(lines)


def validation_seconds(rows):
    return sum(float(row.get('seconds') or 0) for row in rows)


def stages_text(stages):
    text = f'student {stages[-1].duration} images'
    starts = [f'the {stage.S}-step student ({stage.duration} images)' for stage in stages[:-1]]
    return text + ''.join(f', started from {start}' for start in starts)


def write_report(path, rows, sets, points, validation, plot_files, timings, total_seconds, c, stages, seed):
    S = stages[-1].S
    outdir = os.path.dirname(path)
    rel = lambda p: os.path.relpath(p, outdir).replace(os.sep, '/')
    regenerated = [p for p in points if p.validation is not None]
    checks = '\n'.join(f'* {p.name}: {p.value:.4f} in {VALIDATION_FILE}, {p.fd:.4f} from the images sampled here'
                       for p in regenerated)
    grids = ' | '.join(f'[{p.name}]({p.grid})' for p in regenerated)
    curves = '\n'.join(f'* {name}: ' + ', '.join(f'[{os.path.basename(f)}]({rel(f)})' for f in files)
                       for name, files in plot_files.items())
    N = rows[0].num_images
    more_sets = '' if len(sets) == 1 else (f' The teacher\'s Heun and the student are also sampled on seeds {N}-'
        f'{len(sets) * N - 1} ({len(sets) - 1} more sets of {N}) for the mean ratio below: one set of {N} samples moves '
        'the ratio by a few per cent.')
    verdict = ''.join(f'{line}.\n\n' for line in student_verdict(rows, sets).splitlines())
    text = f'''# Quickstart results

S = {S}; teacher {c.teacher_duration} images, {stages_text(stages)}; seed {seed}; EMA profile {EMA_STD}.

FD_digits is the Fréchet distance between the digit classifier's penultimate-layer features
(`digit-features.pkl`, `--detector {METRIC}=digit-features.pkl`) of the images and of the real
training-split digits (`refs-digits.pkl`); it is not FID. Teacher Euler (the baseline) and the student's
final snapshot are validation rows of the student run (`student/{VALIDATION_FILE}`, computed by
train_edm2.py with calculate_metrics); teacher Heun and the real row are measured here with the same
functions. Confidence: mean top-class probability. Class agreement: fraction classified as the class the
sample was conditioned on (for real digits: the classifier's accuracy); both are measured on the same
seeds (0-{rows[0].num_images - 1}), sampled again here.{more_sets}

{format_table(rows)}

{verdict}## FD_digits against network evaluations

![FD_digits vs. NFE](quality-vs-steps.png)

{format_points(points)}

FD_digits of the validation rows recomputed from the images sampled here (same seeds, same code):

{checks}

Sample grids: {grids}.

## Training curves

{curves}

## Timings (this invocation: {dnnlib.util.format_time(total_seconds)})

{format_timings(timings)}

Validation inside the student's training stage: {validation_seconds(validation):.1f} s (baseline included).
'''
    with open(path, 'wt', encoding='utf-8') as f:
        f.write(text)


def write_plots(paths, points, S):
    """The run curves (training.plots.plot_run) and quality-vs-steps.png; returns {run: [PNG paths]}."""
    written = {}
    for name, run_dir in [('teacher', paths.teacher_dir), ('student', paths.student_dir)]:
        written[name] = list(plots.plot_run(run_dir, outdir=os.path.join(paths.outdir, f'plots-{name}')))
    plots.plot_quality_vs_steps(figure_rows(points, S), paths.figure,
        'FD_digits', title=f'FD_digits vs. network evaluations (student trained for S={S})')
    return written

#----------------------------------------------------------------------------

@click.command()
@click.option('--outdir', help='Where to put the dataset, runs, grids, plots and results.md', metavar='DIR', type=str, required=True)
@click.option('--quick', help='Tiny smoke-test configuration (seconds of training; for tests)', is_flag=True)
@click.option('--steps', 'S', help='Student steps S', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--seed', help='Random seed for training and the classifier split', metavar='INT', type=int, default=0, show_default=True)
@click.option('--teacher-duration', help='Teacher training length, e.g. 32Ki [default: by configuration]', metavar='NIMG', type=str)
@click.option('--student-duration', help='Distillation length of the S-step student, e.g. 8Ki [default: by configuration; '
    'full: 20Ki, and 64Ki for S=2 after a 4-step student of 20Ki]', metavar='NIMG', type=str)
def main(outdir, quick, S, seed, teacher_duration, student_duration):
    """Train a digits teacher, distil an S-step student and compare their samples.

    \b
    Examples (about 9 and 28 minutes on 2 idle CPU cores):
      python3 quickstart.py --outdir=quickstart-run
      python3 quickstart.py --outdir=quickstart-run-s2 --steps=2
    """
    c = dnnlib.EasyDict(CONFIGS['quick' if quick else 'full'])
    c.teacher_duration = teacher_duration or c.teacher_duration
    T_start = first_teacher_edges(c)
    if T_start < S:
        raise click.BadParameter(f'the {"quick" if quick else "full"} configuration starts with {T_start} teacher '
            f'edges, fewer than S={S}; choose S <= {T_start}', param_hint='--steps')
    outdir = os.path.abspath(outdir)
    paths = dnnlib.EasyDict(outdir=outdir, dataset=os.path.join(outdir, 'digits-16.zip'),
        detector=os.path.join(outdir, 'digit-features.pkl'), refs=os.path.join(outdir, 'refs-digits.pkl'),
        samples=os.path.join(outdir, 'samples'), figure=os.path.join(outdir, 'quality-vs-steps.png'),
        teacher_dir=os.path.join(outdir, 'teacher'), student_dir=os.path.join(outdir, 'student'))
    paths.teacher = final_snapshot(paths.teacher_dir, c.teacher_duration)
    if student_duration is not None:  # the S-step student's length
        c['few_step_duration' if S in c.chained_steps else 'student_duration'] = student_duration
    stages = student_stages(c, S, dnnlib.EasyDict(start=os.path.join(outdir, f'student{c.start_steps}'), final=paths.student_dir))
    paths.student = stages[-1].snapshot
    os.makedirs(outdir, exist_ok=True)
    timings = []
    started = time.time()

    size_args = [f'--max-images={c.max_images}'] if c.max_images else []
    run_stage(timings, 'dataset', paths.dataset, lambda: run_script('dataset_tool.py', 'convert',
        '--source=sklearn-digits', f'--dest={paths.dataset}', '--resolution=16x16', *size_args))
    images, labels, num_classes = load_labelled_images(paths.dataset)
    train_idx, held_out_idx = split_held_out(len(images), seed=seed)
    run_stage(timings, 'digit classifier', paths.detector, lambda: fit_classifier(paths, images, labels, num_classes,
        train_idx, held_out_idx, c.classifier_epochs, seed))
    run_stage(timings, 'reference statistics', paths.refs, lambda: compute_reference(paths, images[train_idx], c.batch))
    # As many samples as held-out real digits, so that their FDs compare.
    num_images = len(held_out_idx)
    train_models(paths, c, stages, seed, num_images, timings)
    points = sample_all(paths, c, S, num_images, timings)

    print('\n=== quality ===', flush=True)
    start = time.time()
    ref = calculate_metrics.load_stats(paths.refs, verbose=False)
    probs = class_probabilities(load_classifier(paths.detector), images[held_out_idx])
    real = dnnlib.EasyDict(name='real held-out digits', nfe=None, num_images=num_images,
        fd=fd_to_reference(feature_stats(image_batches(images[held_out_idx], c.batch), paths.detector), ref),
        confidence=mean_confidence(probs), agreement=class_agreement(probs, labels[held_out_idx]))
    validation = attach_validation(points, paths, S)
    rows = table_rows(real, points, S)
    sets = verdict_sets(points, S)
    plot_files = write_plots(paths, points, S)
    timings.append(('table and plots', time.time() - start))
    total_seconds = time.time() - started
    write_report(os.path.join(outdir, 'results.md'), rows, sets, points, validation, plot_files, timings, total_seconds,
        c, stages, seed)
    print(format_table(rows))
    print(f'\n{student_verdict(rows, sets)}')
    print(f'\n{format_timings(timings)}\n\nTotal {dnnlib.util.format_time(total_seconds)}. '
          f'Table, figure and curves: {os.path.join(outdir, "results.md")}', flush=True)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
