"""Guided distillation on the digits example: does an S-step student distilled from a guided teacher keep the
guidance, with no guide network at sampling time?

Starting from a finished quick start (its digits, classifier, reference statistics and conditional teacher),
the study trains an unconditional guide (the classifier-free-guidance pairing), distils one student per
guidance weight W (W = 1: the unguided teacher) with `train_edm2.py --guide --guidance`, and measures, on
the same seeds, the guided teacher (EDM2's Heun, 32 steps) and each student (S steps): FD_digits to the
real digits, the classifier's confidence and class agreement (fraction classified as the class the image
was conditioned on), and the FD_digits between each student's samples and each guided teacher's. Every
stage is skipped when its output exists, so the study resumes. --teacher and --guide take other pickles
(e.g. ones trained with EDM2's own code). Results: OUTDIR/results.md, reported in docs/distillation.md.

    python3 quickstart.py --outdir=out/quickstart
    python3 bench/guided_digits.py --quickstart=out/quickstart --outdir=out/guided
"""

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import calculate_metrics  # noqa: E402
import dnnlib  # noqa: E402
import generate_images  # noqa: E402
import quickstart  # noqa: E402
from dnnlib.cli import ImageCount  # noqa: E402
from training.monitoring import HEUN_STEPS  # noqa: E402

#----------------------------------------------------------------------------

def train_guide(ws, duration, seed):
    """An unconditional tiny-img16 network trained on the digits: the guide of classifier-free guidance."""
    quickstart.run_script('train_edm2.py', f'--outdir={ws.guide_dir}', f'--data={ws.dataset}', '--preset=tiny-img16',
        '--cond=False', f'--duration={duration}', f'--snapshot={duration}', f'--checkpoint={duration}',
        f'--seed={seed}', '--status=2Ki')


def distil(run_dir, ws, guidance, S, duration, seed):
    """A cd-tiny-img16 student of the teacher, guided by the guide with weight `guidance` unless it is 1."""
    guided = [f'--guide={ws.guide}', f'--guidance={guidance:g}'] if guidance != 1 else []
    quickstart.run_script('train_edm2.py', f'--outdir={run_dir}', f'--data={ws.dataset}', '--preset=cd-tiny-img16',
        f'--teacher={ws.teacher}', *guided, f'--S={S}', f'--duration={duration}', f'--snapshot={duration}',
        f'--checkpoint={duration}', f'--seed={seed}', '--status=2Ki')


def measure(ws, tag, num_images, batch_size, **generate_kwargs):
    """Sample seeds 0..N-1 with generate_images, save their FD_digits statistics, return their numbers."""
    classifier = quickstart.load_classifier(ws.detector)
    kept = []

    def keeping(batches):
        for r in batches:
            if r.images is not None:
                kept.append((r.images.cpu(), r.labels.argmax(dim=1).cpu()))
            yield r
    batches = generate_images.generate_images(seeds=range(num_images), max_batch_size=batch_size, verbose=False,
        **generate_kwargs)
    stats = quickstart.feature_stats(keeping(batches), ws.detector)
    images, classes = torch.cat([k[0] for k in kept]), torch.cat([k[1] for k in kept])
    probs = quickstart.class_probabilities(classifier, images)
    generate_images.save_png(generate_images.image_grid(images[:64].numpy()), os.path.join(ws.outdir, f'grid-{tag}.png'))
    calculate_metrics.save_stats(stats, os.path.join(ws.outdir, f'stats-{tag}.pkl'))
    numbers = dict(tag=tag, fd=quickstart.fd_to_reference(stats, calculate_metrics.load_stats(ws.refs, verbose=False)),
        confidence=quickstart.mean_confidence(probs), agreement=quickstart.class_agreement(probs, classes.numpy()))
    quickstart.write_json(os.path.join(ws.outdir, f'{tag}.json'), numbers)


def fd_between(ws, tag_a, tag_b):
    load = lambda tag: calculate_metrics.load_stats(os.path.join(ws.outdir, f'stats-{tag}.pkl'), verbose=False)
    return quickstart.fd_to_reference(load(tag_a), load(tag_b))

def comparison_figure(ws, guidances, scale=2, caption_height=14):
    """One picture: a column per W, the guided teacher above its student (the first 64 seeds of each)."""
    import PIL.Image
    import PIL.ImageDraw
    grids = [[PIL.Image.open(os.path.join(ws.outdir, f'grid-{network}-w{w:g}.png')) for network in ('teacher', 'student')]
             for w in guidances]
    width, height = (scale * size for size in grids[0][0].size)
    figure = PIL.Image.new('RGB', (len(guidances) * (width + 4), 2 * (height + caption_height)), 'white')
    draw = PIL.ImageDraw.Draw(figure)
    for column, (w, pair) in enumerate(zip(guidances, grids)):
        for row, (network, grid) in enumerate(zip(('teacher', 'student'), pair)):
            x, y = column * (width + 4), row * (height + caption_height)
            draw.text((x + 2, y + 1), f'{network}, W={w:g}', fill='black')
            figure.paste(grid.resize((width, height), PIL.Image.NEAREST), (x, y + caption_height))
    figure.save(os.path.join(ws.outdir, 'comparison.png'))

#----------------------------------------------------------------------------

def report(ws, guidances, S, num_images, settings):
    rows = {tag: quickstart.read_json(os.path.join(ws.outdir, f'{tag}.json'))
            for w in guidances for tag in (f'teacher-w{w:g}', f'student-w{w:g}')}
    lines = ['# Guided distillation on the digits', '', settings, '',
             f'Seeds 0-{num_images - 1}; teacher: EDM2 Heun, {HEUN_STEPS} steps; students: {S} steps, no guide.', '',
             '| images | W | NFE | FD_digits | confidence | class agreement | ' +
             ' | '.join(f'FD to teacher W={w:g}' for w in guidances) + ' |',
             '|---|---:|---:|---:|---:|---:|' + '---:|' * len(guidances)]
    for w in guidances:
        rows[f'student-w{w:g}']['fd_to'] = {f'teacher-w{v:g}': fd_between(ws, f'student-w{w:g}', f'teacher-w{v:g}')
                                            for v in guidances}
        for network, nfe in (('teacher', (2 * HEUN_STEPS - 1) * (1 if w == 1 else 2)), ('student', S)):
            r = rows[f'{network}-w{w:g}']
            cross = [f'{r["fd_to"][f"teacher-w{v:g}"]:.2f}' if network == 'student' else '-' for v in guidances]
            lines.append(f'| {network} | {w:g} | {nfe} | {r["fd"]:.2f} | {r["confidence"]:.3f} | {r["agreement"]:.3f} | '
                + ' | '.join(cross) + ' |')
    text = '\n'.join(lines) + '\n'
    quickstart.write_json(os.path.join(ws.outdir, 'results.json'), rows)
    with open(os.path.join(ws.outdir, 'results.md'), 'w') as f:
        f.write(text)
    print('\n' + text)

#----------------------------------------------------------------------------

@click.command()
@click.option('--quickstart', 'quickstart_dir', help='Output folder of a finished quickstart.py run', metavar='DIR', type=click.Path(file_okay=False, exists=True), required=True)
@click.option('--outdir', help='Where to write the study', metavar='DIR', type=str, required=True)
@click.option('--teacher', help='Conditional teacher pickle [default: the quick start\'s]', metavar='PKL', type=click.Path(dir_okay=False, exists=True))
@click.option('--guide', help='Guide pickle [default: train an unconditional one]', metavar='PKL', type=click.Path(dir_okay=False, exists=True))
@click.option('--guide-duration', help='Training length of the trained guide', metavar='NIMG', type=ImageCount(), default='8Ki', show_default=True)
@click.option('--guidance', 'guidances', help='Guidance weights, one student each (1 = unguided)', metavar='LIST', type=str, default='1,1.5,2', show_default=True)
@click.option('--S', 'S', help='Student steps', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--student-duration', help='Distillation length of each student', metavar='NIMG', type=ImageCount(), default='8Ki', show_default=True)
@click.option('--num', 'num_images', help='Images per measurement', metavar='INT', type=click.IntRange(min=2), default=449, show_default=True)
@click.option('--seed', help='Training seed', metavar='INT', type=int, default=0, show_default=True)
def main(quickstart_dir, outdir, teacher, guide, guide_duration, guidances, S, student_duration, num_images, seed):
    """Distil students of a guided digits teacher and measure what the guidance does."""
    try:
        guidances = sorted({float(w) for w in guidances.split(',')})
    except ValueError:
        raise click.BadParameter(f'expected comma-separated numbers, got {guidances!r}', param_hint='--guidance')
    if not all(w >= 0 for w in guidances):
        raise click.BadParameter('guidance weights must be non-negative', param_hint='--guidance')
    ws = dnnlib.EasyDict(outdir=outdir, dataset=os.path.join(quickstart_dir, 'digits-16.zip'),
        detector=os.path.join(quickstart_dir, 'digit-features.pkl'), refs=os.path.join(quickstart_dir, 'refs-digits.pkl'),
        guide_dir=os.path.join(outdir, 'guide'))
    ws.teacher = teacher or quickstart.final_snapshot(os.path.join(quickstart_dir, 'teacher'), '32Ki')
    ws.guide = guide or quickstart.final_snapshot(ws.guide_dir, str(guide_duration))
    for path in (ws.dataset, ws.detector, ws.refs, ws.teacher):
        if not os.path.isfile(path):
            raise click.ClickException(f'{path} is missing: give --quickstart a finished quickstart.py output folder')
    os.makedirs(outdir, exist_ok=True)
    timings = []
    if guide is None:
        quickstart.run_stage(timings, 'guide', ws.guide, lambda: train_guide(ws, str(guide_duration), seed))
    batch = 64
    for w in guidances:
        run_dir = os.path.join(outdir, f'student-w{w:g}')
        student = quickstart.final_snapshot(run_dir, str(student_duration))
        quickstart.run_stage(timings, f'student W={w:g}', student,
            lambda run_dir=run_dir, w=w: distil(run_dir, ws, w, S, str(student_duration), seed))
        teacher_kwargs = dict(net=ws.teacher, sampler_fn='heun', num_steps=HEUN_STEPS)
        if w != 1:
            teacher_kwargs.update(gnet=ws.guide, guidance=w)
        quickstart.run_stage(timings, f'samples: teacher W={w:g}', os.path.join(outdir, f'teacher-w{w:g}.json'),
            lambda w=w, kwargs=teacher_kwargs: measure(ws, f'teacher-w{w:g}', num_images, batch, **kwargs))
        quickstart.run_stage(timings, f'samples: student W={w:g}', os.path.join(outdir, f'student-w{w:g}.json'),
            lambda w=w, student=student: measure(ws, f'student-w{w:g}', num_images, batch, net=student))
    comparison_figure(ws, guidances)
    report(ws, guidances, S, num_images, f'Teacher `{ws.teacher}`, guide `{ws.guide}`; students cd-tiny-img16, '
        f'{student_duration} images, seed {seed}.')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
