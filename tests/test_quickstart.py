"""quickstart.py and its digit feature network (training/digit_features.py): the classifier, FD_digits through
calculate_metrics, the sampled points, and the whole example end to end (slow)."""

import json
import re

import numpy as np
import pytest
import scipy.linalg
import torch

import calculate_metrics
import quickstart
from helpers import load_pickle, make_digits_zip, run_script, save_pickle
from training import digit_features


pytestmark = pytest.mark.usefixtures('single_thread')


@pytest.fixture(scope='module')
def digits_zip(tmp_path_factory):
    return make_digits_zip(tmp_path_factory.mktemp('digits') / 'digits-16.zip')  # all 1797 digits


@pytest.fixture(scope='module')
def digits(digits_zip, tmp_path_factory):
    images, labels, _ = quickstart.load_labelled_images(digits_zip)
    train_idx, held_out_idx = quickstart.split_held_out(len(images), seed=0)
    classifier = digit_features.train_digit_classifier(images[train_idx], labels[train_idx], num_classes=10, epochs=10)
    path = save_pickle(classifier, tmp_path_factory.mktemp('classifier') / 'digit-features.pkl')
    return images, labels, train_idx, held_out_idx, classifier, path


@pytest.fixture
def fresh_detectors(monkeypatch):
    monkeypatch.setattr(calculate_metrics, '_detector_cache', {})


def fd_by_hand(f, f_ref):
    mu, mu_ref = f.mean(0), f_ref.mean(0)
    s, s_ref = np.cov(f, rowvar=False), np.cov(f_ref, rowvar=False)
    return np.sum((mu - mu_ref) ** 2) + np.trace(s + s_ref - 2 * np.real(scipy.linalg.sqrtm(s @ s_ref)))


def test_load_labelled_images(digits_zip):
    images, labels, num_classes = quickstart.load_labelled_images(digits_zip)
    assert num_classes == 10
    assert images.shape == (1797, 3, 16, 16) and images.dtype == np.uint8
    assert labels.shape == (1797,)
    assert sorted(set(labels.tolist())) == list(range(10))
    assert 0 < images.mean() < 128   # white strokes on black


def test_split_held_out_is_a_reproducible_partition():
    train_idx, held_out_idx = quickstart.split_held_out(100, held_out_fraction=0.25, seed=3)
    assert len(held_out_idx) == 25
    assert sorted(np.concatenate([train_idx, held_out_idx]).tolist()) == list(range(100))
    again = quickstart.split_held_out(100, held_out_fraction=0.25, seed=3)
    assert np.array_equal(held_out_idx, again[1])
    assert not np.array_equal(held_out_idx, quickstart.split_held_out(100, held_out_fraction=0.25, seed=4)[1])


def test_classifier_is_accurate_on_held_out_digits(digits):
    images, labels, _, held_out_idx, classifier, _ = digits
    with torch.no_grad():
        features = classifier(torch.as_tensor(images[held_out_idx]))
    assert features.shape == (len(held_out_idx), 64) and features.dtype == torch.float32
    probs = quickstart.class_probabilities(classifier, images[held_out_idx])
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-6)
    accuracy = np.mean(probs.argmax(axis=1) == labels[held_out_idx])
    assert accuracy > 0.9
    assert quickstart.class_agreement(probs, labels[held_out_idx]) == pytest.approx(accuracy)


def test_classifier_pickle_carries_its_source_and_is_the_fd_digits_detector(digits, fresh_detectors, tmp_path):
    images, _, _, held_out_idx, classifier, path = digits
    loaded = load_pickle(path)
    assert type(loaded) is not digit_features.DigitClassifier and type(loaded).__name__ == 'DigitClassifier'  # rebuilt from its source
    batch = torch.as_tensor(images[held_out_idx[:20]])
    with torch.no_grad():
        assert torch.equal(loaded(batch), classifier(batch))
        assert torch.equal(loaded.class_probabilities(batch), classifier.class_probabilities(batch))
    detector = calculate_metrics.get_detector('fd_digits', verbose=False, source=path)
    assert detector.feature_dim == 64 and torch.equal(detector(batch), classifier(batch))
    assert quickstart.load_classifier(path) is detector.model
    # A process that never imports training.digit_features loads it too.
    np.save(tmp_path / 'batch.npy', batch.numpy())
    code = ('import pickle, sys, numpy, torch; net = pickle.load(open(sys.argv[1], "rb")); '
            'assert "training.digit_features" not in sys.modules; '
            'numpy.save(sys.argv[3], net(torch.as_tensor(numpy.load(sys.argv[2]))).detach().numpy())')
    run_script('-c', code, path, tmp_path / 'batch.npy', tmp_path / 'features.npy')
    np.testing.assert_array_equal(np.load(tmp_path / 'features.npy'), classifier(batch).detach().numpy())


def test_fd_digits_through_calculate_metrics(digits, fresh_detectors):
    images, _, train_idx, held_out_idx, classifier, path = digits
    ref = quickstart.feature_stats(quickstart.image_batches(images[train_idx], 128), path)
    assert list(ref) == ['num_images', 'fd_digits'] and ref['num_images'] == len(train_idx)
    real = quickstart.fd_to_reference(quickstart.feature_stats(quickstart.image_batches(images[held_out_idx], 100), path), ref)
    with torch.no_grad():
        features = lambda x: classifier(torch.as_tensor(x)).double().numpy()
        assert real == pytest.approx(fd_by_hand(features(images[held_out_idx]), features(images[train_idx])), rel=1e-4)
        noise_images = np.random.RandomState(0).randint(0, 256, size=images[held_out_idx].shape).astype(np.uint8)
    noise = quickstart.fd_to_reference(quickstart.feature_stats(quickstart.image_batches(noise_images, 128), path), ref)
    assert real < 0.1 * noise
    assert quickstart.mean_confidence(quickstart.class_probabilities(classifier, images[held_out_idx])) > 0.8


def test_confidence_and_agreement_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.3, 0.3, 0.4], [0.9, 0.05, 0.05]])
    assert quickstart.mean_confidence(probs) == pytest.approx((0.7 + 0.5 + 0.4 + 0.9) / 4)
    assert quickstart.class_agreement(probs, [0, 2, 2, 1]) == pytest.approx(0.5)


def test_format_table_lists_every_row():
    rows = [quickstart.dnnlib.EasyDict(name='real', nfe=None, num_images=5, fd=0.25, confidence=0.9, agreement=0.8),
            quickstart.dnnlib.EasyDict(name='student', nfe=4, num_images=5, fd=3.5, confidence=0.7, agreement=None)]
    lines = quickstart.format_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[2] == '| real | - | 5 | 0.25 | 0.900 | 0.800 |'
    assert lines[3] == '| student | 4 | 5 | 3.50 | 0.700 | - |'


def test_sample_points_and_figure_lines():
    c = quickstart.CONFIGS['full']
    points = quickstart.sample_points(c, S=4)
    keys = [(p.network, p.sampler, p.steps, p.nfe) for p in points]
    assert keys == [('teacher', 'euler', k, k) for k in (1, 2, 4, 8, 16)] + \
        [('teacher', 'heun', k, 2 * k - 1) for k in (2, 4, 8, 16, 32)] + [('student', 'euler', k, k) for k in (1, 2, 4, 8)]
    assert len({p.tag for p in points}) == len(points)
    names = {p.steps: p.name for p in points if p.network == 'student'}
    assert names[4] == 'student, 4 steps' and names[1] == 'student, 1 step (trained for S=4: off its grid)'
    for p in points:
        p.value = float(p.nfe)
    rows = quickstart.figure_rows(points, S=4)
    lines = {}
    for row in rows:
        lines.setdefault(row['name'], []).append(row['nfe'])
    assert lines == {'teacher, Euler': [1, 2, 4, 8, 16], 'teacher, Heun': [3, 7, 15, 31, 63],
                     'same student, also at 1, 2, 8 steps (off its grid)': [1, 2, 4, 8], 'student, S=4 (its training grid)': [4]}
    assert list(lines)[-1] == 'student, S=4 (its training grid)'  # drawn last, on top of the other student line
    # S outside the configured lists is added: the table's rows are always there.
    extra = quickstart.sample_points(quickstart.CONFIGS['quick'], S=3)
    assert {('teacher', 'euler', 3), ('teacher', 'heun', 32), ('student', 'euler', 3)} <= {(p.network, p.sampler, p.steps) for p in extra}


def test_students_of_few_steps_start_from_a_student_of_more():
    c = quickstart.dnnlib.EasyDict(quickstart.CONFIGS['full'])
    run_dirs = quickstart.dnnlib.EasyDict(start='runs/student4', final='runs/student')
    alone = quickstart.student_stages(c, 4, run_dirs)
    assert [(stage.S, stage.duration, stage.snapshot) for stage in alone] == [
        (4, c.student_duration, quickstart.final_snapshot('runs/student', c.student_duration))]
    chained = quickstart.student_stages(c, 2, run_dirs)
    assert [(stage.S, stage.duration, stage.run_dir) for stage in chained] == [
        (c.start_steps, c.student_duration, 'runs/student4'), (2, c.few_step_duration, 'runs/student')]
    assert quickstart.stages_text(chained) == (f'student {c.few_step_duration} images, started from the '
        f'{c.start_steps}-step student ({c.student_duration} images)')
    assert [stage.S for stage in quickstart.student_stages(c, 8, run_dirs)] == [8]
    assert c.chained_steps == [2]  # the 1-step student starts from the teacher
    assert [(stage.S, stage.duration) for stage in quickstart.student_stages(c, 1, run_dirs)] == [(1, c.student_duration)]


def test_student_verdict_takes_the_mean_ratio_over_seed_sets():
    E = quickstart.dnnlib.EasyDict
    rows = [None, E(name='teacher Heun, 32 steps', nfe=63, fd=20.0), None, E(name='student, 4 steps', nfe=4, fd=22.0, num_images=5)]
    first = 'student, 4 steps: FD_digits 22.00 = 1.100 x that of teacher Heun, 32 steps (20.00), with 4 instead of 63 network evaluations'
    assert quickstart.student_verdict(rows, [E(seeds=[0, 4], teacher=20.0, student=22.0)]) == first
    sets = [E(seeds=[0, 4], teacher=20.0, student=22.0), E(seeds=[5, 9], teacher=40.0, student=40.0)]
    # The mean of the two ratios (1.1 and 1.0), not the ratio of the mean FDs (62 / 60).
    assert quickstart.student_verdict(rows, sets).splitlines() == [first,
        "student, 4 steps, mean over 2 sets of 5 seeds: 1.050 x the teacher's FD_digits "
        "(seeds 0-4: 22.00 / 20.00 = 1.100; seeds 5-9: 40.00 / 40.00 = 1.000)"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def table_lines(text):
    """{row name: cells} of the quality table (the one with a 'class agreement' column and an 'N' column)."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
        if len(cells) == 6 and line.startswith('| ') and cells[0] != 'images':
            rows[cells[0]] = cells
    return rows


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    outdir = tmp_path / 'run'
    command = ['quickstart.py', f'--outdir={outdir}', '--quick', '--steps=2']
    result = run_script(*command, timeout=1200)
    c = quickstart.CONFIGS['quick']
    images, _, _ = quickstart.load_labelled_images(str(outdir / 'digits-16.zip'))
    train_idx, held_out_idx = quickstart.split_held_out(len(images), seed=0)
    num = len(held_out_idx)

    # The reference statistics are calculate_metrics' statistics of the training-split digits.
    ref = calculate_metrics.load_stats(str(outdir / 'refs-digits.pkl'), verbose=False)
    assert list(ref) == ['num_images', 'fd_digits'] and ref['num_images'] == len(train_idx) == c.max_images - num
    net = load_pickle(outdir / 'digit-features.pkl')
    with torch.no_grad():
        features = net(torch.as_tensor(images[train_idx])).double().numpy()
    np.testing.assert_allclose(ref['fd_digits']['mu'], features.mean(0), rtol=1e-5, atol=1e-6)

    # Validation rows: the student run's (the teacher's Euler baseline and the student); the teacher run has none,
    # its Heun row is measured in-process from the samples the figure needs anyway.
    assert not (outdir / 'teacher' / 'metrics-val.jsonl').exists()
    student_rows = read_jsonl(outdir / 'student' / 'metrics-val.jsonl')
    assert [(r['network'], r['sampler'], r['steps'], r['nfe'], r['metric'], r['images']) for r in student_rows] == [
        ('teacher', 'euler', 2, 2, 'fd_digits', num), ('trained', 'euler', 2, 2, 'fd_digits', num)]
    assert student_rows[-1]['snapshot'] == 'network-snapshot-0000001-0.100.pkl'
    # A 2-step student starts from a c.start_steps-step student, trained first.
    start = outdir / f'student{c.start_steps}' / 'network-snapshot-0000001-0.100.pkl'
    assert load_pickle(start)['cd']['S'] == c.start_steps and not (start.parent / 'metrics-val.jsonl').exists()
    student_options = json.loads((outdir / 'student' / 'training_options.json').read_text())['loss_kwargs']
    assert student_options['init_pkl'] == str(start) and student_options['S'] == 2
    points = {p.tag: json.loads((outdir / 'samples' / f'{p.tag}.json').read_text()) for p in quickstart.sample_points(c, 2)}
    heun = points['teacher-heun32']
    assert (heun['network'], heun['sampler'], heun['steps'], heun['nfe'], heun['num_images']) == ('teacher', 'heun', 32, 63, num)
    assert heun['seeds'] == [0, num - 1]
    teacher_row = dict(nfe=63, value=heun['fd'])
    # The verdict's two networks are sampled on a second set of seeds as well (c.seed_sets == 2), the others not.
    assert c.seed_sets == 2
    more = {tag: json.loads((outdir / 'samples' / f'{tag}-seeds{num}.json').read_text()) for tag in ['teacher-heun32', 'student2']}
    for tag, point in more.items():
        assert point['seeds'] == [num, 2 * num - 1] and point['num_images'] == num and point['tag'] == tag
        assert point['fd'] != points[tag]['fd']
    assert sorted(p.name for p in (outdir / 'samples').glob('*.json')) == sorted(
        [f'{tag}.json' for tag in points] + [f'{tag}-seeds{num}.json' for tag in more])

    # The table: its FD values are the validation values (the teacher's Heun: the in-process one); the sampled
    # images give the same ones again.
    results = (outdir / 'results.md').read_text()
    assert f'student 1Ki images, started from the {c.start_steps}-step student (1Ki images)' in results
    table = table_lines(results)
    expected = {'teacher Heun, 32 steps': teacher_row, 'teacher Euler, 2 steps': student_rows[0],
                'student, 2 steps': student_rows[1]}
    assert list(table) == ['real held-out digits', *expected]
    assert table_lines(result.stdout) == table
    ratio = student_rows[1]['value'] / teacher_row['value']
    verdict = (f'student, 2 steps: FD_digits {student_rows[1]["value"]:.2f} = {ratio:.3f} x that of teacher Heun, '
               f'32 steps ({teacher_row["value"]:.2f}), with 2 instead of 63 network evaluations')
    assert verdict in result.stdout.splitlines() and f'{verdict}.' in results.splitlines()
    second_ratio = more['student2']['fd'] / more['teacher-heun32']['fd']
    mean = (f"student, 2 steps, mean over 2 sets of {num} seeds: {(ratio + second_ratio) / 2:.3f} x the teacher's FD_digits "
            f'(seeds 0-{num - 1}: {student_rows[1]["value"]:.2f} / {teacher_row["value"]:.2f} = {ratio:.3f}; '
            f'seeds {num}-{2 * num - 1}: {more["student2"]["fd"]:.2f} / {more["teacher-heun32"]["fd"]:.2f} = {second_ratio:.3f})')
    assert mean in result.stdout.splitlines() and f'{mean}.' in results.splitlines()
    for name, row in expected.items():
        assert table[name][1:4] == [str(row['nfe']), str(num), f'{row["value"]:.2f}']
    for tag, row in zip(['teacher-euler2', 'student2'], student_rows):
        assert points[tag]['fd'] == pytest.approx(row['value'], rel=1e-4) and points[tag]['num_images'] == num
    assert table['student, 2 steps'][4:] == [f'{points["student2"]["confidence"]:.3f}', f'{points["student2"]["agreement"]:.3f}']
    assert float(table['real held-out digits'][3]) < min(row['value'] for row in student_rows)

    # Curves, figure and grids.
    assert not (outdir / 'plots-teacher' / 'validation.png').exists()
    pngs = ['plots-teacher/loss.png', 'plots-student/loss.png', 'plots-student/cd.png',
            'plots-student/validation.png', 'quality-vs-steps.png'] + [f'samples/grid-{tag}.png' for tag in points]
    for png in pngs:
        assert (outdir / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', png
    for png in pngs[:-len(points)]:
        assert f']({png})' in results
    assert re.search(r'\| teacher Euler, 1 step \| euler \| 1 \| 1 \| [0-9.]+ \| in-process \|', results)

    rerun = run_script(*command)
    # dataset, classifier, references, teacher, the two students, points, the second seed set
    assert rerun.stdout.count('skipping') == 6 + len(points) + len(more)
    assert table_lines(rerun.stdout) == table

    # Another S in the same directory would reuse the 2-step student: refused, naming the directory (a 3-step
    # student starts from the teacher).
    other = run_script('quickstart.py', f'--outdir={outdir}', '--quick', '--steps=3', check=False)
    assert other.returncode != 0 and 'Traceback' not in other.stderr
    assert f'{outdir / "student"} holds a 2-step student started from {start}, not the 3-step student started from the teacher' in other.stderr
