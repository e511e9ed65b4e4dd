"""Built-in end-to-end example that runs on a few CPU cores.

Builds the scikit-learn digits dataset, trains a small EDM2 teacher, distils an S-step consistency
student, writes sample grids and prints an offline quality table. The table measures samples with a
small digit classifier trained here on the real images: FD_digits (Frechet distance of its
penultimate-layer features to those of real digits; not FID), its mean confidence, and how often it
agrees with the class a sample was conditioned on. Rerunning with the same --outdir skips finished
stages and resumes unfinished training.
"""

import os
import shlex
import subprocess
import sys
import time

import click
import numpy as np
import PIL.Image
import torch

import calculate_metrics
import dnnlib
import generate_images
from torch_utils import misc
from train_edm2 import ImageCount
from training.dataset import ImageFolderDataset

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))

#----------------------------------------------------------------------------
# Configurations. Durations are image counts in train_edm2.py's syntax.

CONFIGS = {
    'full': dnnlib.EasyDict(max_images=None, teacher_duration='32Ki', student_duration='8Ki', heun_steps=16,
        status='2Ki', T_start=16, T_end=64, T_anneal_kimg=4, classifier_epochs=10),
    'quick': dnnlib.EasyDict(max_images=200, teacher_duration='1Ki', student_duration='1Ki', heun_steps=4,
        status='1Ki', T_start=8, T_end=8, T_anneal_kimg=0, classifier_epochs=5),
}
EMA_STD = '0.100'   # the post-hoc EMA profile taken from both training runs
HELD_OUT_FRACTION = 0.25

#----------------------------------------------------------------------------
# Digit classifier: the feature extractor behind the quality table.

class DigitClassifier(torch.nn.Module):
    """Small CNN for uint8 RGB digit images; `features()` is the penultimate layer used for FD_digits."""

    def __init__(self, num_classes=10, feature_dim=64):
        super().__init__()
        self.trunk = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, kernel_size=3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
            torch.nn.Linear(64 * 4 * 4, feature_dim), torch.nn.SiLU())
        self.head = torch.nn.Linear(feature_dim, num_classes)

    def features(self, images):
        return self.trunk(images.to(torch.float32) / 127.5 - 1)

    def forward(self, images):
        return self.head(self.features(images))


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


def train_classifier(images, labels, num_classes, epochs=20, batch_size=64, lr=2e-3, seed=0):
    """Fit a DigitClassifier with Adam and cross-entropy; returns it in eval mode on the CPU."""
    torch.manual_seed(seed)
    net = DigitClassifier(num_classes=num_classes)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    images, labels = torch.as_tensor(images), torch.as_tensor(labels, dtype=torch.int64)
    shuffle = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=shuffle).split(batch_size):
            loss = torch.nn.functional.cross_entropy(net(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


@torch.no_grad()
def classify(net, images, batch_size=256):
    """Penultimate-layer features [N,D] (float64) and class probabilities [N,K] for uint8 images [N,C,H,W]."""
    features, probs = [], []
    for batch in torch.as_tensor(np.asarray(images)).split(batch_size):
        f = net.features(batch)
        features.append(f.double())
        probs.append(net.head(f).softmax(dim=1).double())
    return torch.cat(features).numpy(), torch.cat(probs).numpy()

#----------------------------------------------------------------------------
# Metrics.

def frechet_distance(features_a, features_b):
    """Frechet distance between Gaussians fitted to two feature sets [N,D], by calculate_metrics' formula."""
    fit = lambda features: (features.mean(axis=0), np.cov(features, rowvar=False))
    return calculate_metrics.frechet_distance(*fit(features_a), *fit(features_b))


def mean_confidence(probs):
    """Mean over images of the classifier's top-class probability."""
    return float(probs.max(axis=1).mean())


def class_agreement(probs, classes):
    """Fraction of images that the classifier assigns to the given classes."""
    return float((probs.argmax(axis=1) == np.asarray(classes)).mean())


def quality_row(name, nfe, net, images, reference_features, classes=None):
    """One line of the quality table for a set of uint8 images, compared with the reference features."""
    features, probs = classify(net, images)
    return dnnlib.EasyDict(name=name, nfe=nfe, num_images=len(images),
        fd=frechet_distance(features, reference_features), confidence=mean_confidence(probs),
        agreement=None if classes is None else class_agreement(probs, classes))


def format_table(rows):
    """Markdown table of quality rows."""
    lines = ['| images | NFE | N | FD_digits (lower is better) | confidence | class agreement |',
             '|---|---:|---:|---:|---:|---:|']
    for r in rows:
        agreement = '-' if r.agreement is None else f'{r.agreement:.3f}'
        lines.append(f'| {r.name} | {r.nfe if r.nfe is not None else "-"} | {r.num_images} | {r.fd:.2f} '
                     f'| {r.confidence:.3f} | {agreement} |')
    return '\n'.join(lines)

#----------------------------------------------------------------------------
# Generated images.

def conditioned_classes(seeds, label_dim, image_shape, device=None):
    """The class generate_images.py conditions each seed on when no --class is given: each seed's own
    generator draws the initial noise first and the class index next."""
    device = torch.device(device) if device is not None else misc.default_device()
    streams = generate_images.StackedRandomGenerator(device, seeds)
    streams.randn([len(seeds), *image_shape], device=device)
    return streams.randint(label_dim, size=[len(seeds)], device=device).cpu().numpy()


def load_generated(image_dir, seeds):
    """uint8 images [N,C,H,W] that generate_images.py wrote for the given seeds."""
    images = []
    for seed in seeds:
        path = generate_images.image_path(image_dir, seed)
        if not os.path.isfile(path):
            raise click.ClickException(f'{path} is missing; delete the matching grid-*.png and rerun to sample it again')
        with PIL.Image.open(path) as image:
            images.append(np.asarray(image.convert('RGB')).transpose(2, 0, 1))
    return np.stack(images)

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


def fit_classifier(dataset_path, classifier_path, epochs, seed):
    """Train the digit classifier on the training split and save it with the held-out indices."""
    images, labels, num_classes = load_labelled_images(dataset_path)
    train_idx, held_out_idx = split_held_out(len(images), seed=seed)
    net = train_classifier(images[train_idx], labels[train_idx], num_classes=num_classes, epochs=epochs, seed=seed)
    _, probs = classify(net, images[held_out_idx])
    print(f'Digit classifier: {class_agreement(probs, labels[held_out_idx]):.1%} accuracy on {len(held_out_idx)} '
          'held-out images', flush=True)
    torch.save(dict(state_dict=net.state_dict(), held_out_idx=torch.as_tensor(held_out_idx)), classifier_path)


def load_classifier(classifier_path):
    saved = torch.load(classifier_path, weights_only=True)
    net = DigitClassifier(num_classes=saved['state_dict']['head.bias'].numel())
    net.load_state_dict(saved['state_dict'])
    return net.eval(), saved['held_out_idx'].numpy()


def train_models(paths, c, S, seed, timings):
    """Teacher (plain EDM2 training), then the S-step student distilled from it (CD mode)."""
    common = [f'--data={paths.dataset}', f'--seed={seed}', f'--status={c.status}']
    run_stage(timings, 'teacher', paths.teacher, lambda: run_script('train_edm2.py', f'--outdir={paths.teacher_dir}',
        *common, '--preset=tiny-img16', f'--duration={c.teacher_duration}', f'--snapshot={c.teacher_duration}',
        f'--checkpoint={c.teacher_duration}'))
    run_stage(timings, f'student (S={S})', paths.student, lambda: run_script('train_edm2.py',
        f'--outdir={paths.student_dir}', *common, '--preset=cd-tiny-img16', f'--teacher={paths.teacher}', f'--S={S}',
        f'--T_start={c.T_start}', f'--T_end={c.T_end}', f'--T_anneal_kimg={c.T_anneal_kimg}',
        f'--duration={c.student_duration}', f'--snapshot={c.student_duration}', f'--checkpoint={c.student_duration}'))


def generate_sample_sets(paths, c, S, num_images, timings):
    """Same seeds for teacher Heun (many steps), teacher Euler (S steps) and the student (S steps)."""
    sample_sets = [
        dnnlib.EasyDict(name=f'teacher Heun, {c.heun_steps} steps', nfe=2 * c.heun_steps - 1, tag='teacher-heun',
            net=paths.teacher, sampler_args=['--sampler=heun', f'--steps={c.heun_steps}']),
        dnnlib.EasyDict(name=f'teacher Euler, {S} steps', nfe=S, tag=f'teacher-euler{S}',
            net=paths.teacher, sampler_args=['--sampler=euler', f'--steps={S}']),
        dnnlib.EasyDict(name=f'student, {S} steps', nfe=S, tag=f'student{S}',
            net=paths.student, sampler_args=['--sampler=euler', f'--steps={S}']),
    ]
    for s in sample_sets:
        s.image_dir = os.path.join(paths.samples, s.tag)
        s.grid = os.path.join(paths.outdir, f'grid-{s.tag}.png')
        run_stage(timings, f'samples: {s.name}', s.grid, lambda: run_script('generate_images.py', f'--net={s.net}',
            f'--outdir={s.image_dir}', f'--seeds=0-{num_images - 1}', f'--grid={s.grid}', '--batch=128', *s.sampler_args))
    return sample_sets


def evaluate(dataset_path, net, held_out_idx, sample_sets):
    """Quality rows for the real held-out digits and for each sample set, all against the training-split digits."""
    images, labels, _ = load_labelled_images(dataset_path)
    reference_idx = np.setdiff1d(np.arange(len(images)), held_out_idx)
    reference_features, _ = classify(net, images[reference_idx])
    rows = [quality_row('real held-out digits', None, net, images[held_out_idx], reference_features, labels[held_out_idx])]
    seeds = range(len(held_out_idx))
    classes = conditioned_classes(seeds, net.head.out_features, images.shape[1:])
    for s in sample_sets:
        rows.append(quality_row(s.name, s.nfe, net, load_generated(s.image_dir, seeds), reference_features, classes))
    return rows


def format_timings(timings):
    lines = ['| stage | time |', '|---|---:|']
    for name, seconds in timings:
        lines.append(f'| {name} | {"skipped (done earlier)" if seconds is None else dnnlib.util.format_time(seconds)} |')
    return '\n'.join(lines)


def write_report(path, rows, timings, total_seconds, c, S, seed):
    text = (f'# Quickstart results\n\nS = {S}; teacher {c.teacher_duration} images, student {c.student_duration} '
        f'images; seed {seed}.\n\nFD_digits: Frechet distance between digit-classifier features of the images and of '
        f'the real training-split digits (not FID). Confidence: mean top-class probability. Class agreement: fraction '
        f'classified as the class the sample was conditioned on (for real digits: the classifier accuracy).\n\n'
        f'{format_table(rows)}\n\n## Timings (this invocation: {dnnlib.util.format_time(total_seconds)})\n\n'
        f'{format_timings(timings)}\n')
    with open(path, 'wt') as f:
        f.write(text)

#----------------------------------------------------------------------------

@click.command()
@click.option('--outdir', help='Where to put the dataset, runs, grids and results.md', metavar='DIR', type=str, required=True)
@click.option('--quick', help='Tiny smoke-test configuration (seconds of training; for tests)', is_flag=True)
@click.option('--steps', 'S', help='Student steps S', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--seed', help='Random seed for training and the classifier split', metavar='INT', type=int, default=0, show_default=True)
@click.option('--teacher-duration', help='Teacher training length, e.g. 32Ki [default: by configuration]', metavar='NIMG', type=str)
@click.option('--student-duration', help='Student distillation length, e.g. 8Ki [default: by configuration]', metavar='NIMG', type=str)
def main(outdir, quick, S, seed, teacher_duration, student_duration):
    """Train a digits teacher, distil an S-step student and compare their samples.

    \b
    Example (about 6 minutes on 2 idle CPU cores):
      python3 quickstart.py --outdir=quickstart-run
    """
    c = dnnlib.EasyDict(CONFIGS['quick' if quick else 'full'])
    c.teacher_duration = teacher_duration or c.teacher_duration
    c.student_duration = student_duration or c.student_duration
    if c.T_start < S:
        raise click.BadParameter(f'the {"quick" if quick else "full"} configuration starts with {c.T_start} teacher '
            f'edges, fewer than S={S}; choose S <= {c.T_start}', param_hint='--steps')
    outdir = os.path.abspath(outdir)
    paths = dnnlib.EasyDict(outdir=outdir, dataset=os.path.join(outdir, 'digits-16.zip'),
        classifier=os.path.join(outdir, 'digit-classifier.pt'), samples=os.path.join(outdir, 'samples'),
        teacher_dir=os.path.join(outdir, 'teacher'), student_dir=os.path.join(outdir, 'student'))
    paths.teacher = final_snapshot(paths.teacher_dir, c.teacher_duration)
    paths.student = final_snapshot(paths.student_dir, c.student_duration)
    os.makedirs(outdir, exist_ok=True)
    timings = []
    started = time.time()

    size_args = [f'--max-images={c.max_images}'] if c.max_images else []
    run_stage(timings, 'dataset', paths.dataset, lambda: run_script('dataset_tool.py', 'convert',
        '--source=sklearn-digits', f'--dest={paths.dataset}', '--resolution=16x16', *size_args))
    run_stage(timings, 'digit classifier', paths.classifier,
        lambda: fit_classifier(paths.dataset, paths.classifier, epochs=c.classifier_epochs, seed=seed))
    train_models(paths, c, S, seed, timings)
    classifier, held_out_idx = load_classifier(paths.classifier)
    # As many samples as held-out real digits, so that their FDs compare.
    sample_sets = generate_sample_sets(paths, c, S, len(held_out_idx), timings)

    print('\n=== quality ===', flush=True)
    rows = evaluate(paths.dataset, classifier, held_out_idx, sample_sets)
    total_seconds = time.time() - started
    write_report(os.path.join(outdir, 'results.md'), rows, timings, total_seconds, c, S, seed)
    print(format_table(rows))
    print(f'\n{format_timings(timings)}\n\nTotal {dnnlib.util.format_time(total_seconds)}. '
          f'Grids: {os.path.join(outdir, "grid-*.png")}; table: {os.path.join(outdir, "results.md")}', flush=True)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
