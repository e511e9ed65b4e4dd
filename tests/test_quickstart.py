"""quickstart.py: the digit-classifier quality metrics, and the whole example end to end (slow)."""

import numpy as np
import pytest
import scipy.linalg
import torch

import generate_images
import quickstart
from helpers import make_digits_zip, run_script, tiny_precond


pytestmark = pytest.mark.usefixtures('single_thread')


@pytest.fixture(scope='module')
def digits_zip(tmp_path_factory):
    return make_digits_zip(tmp_path_factory.mktemp('digits') / 'digits-16.zip')  # all 1797 digits


@pytest.fixture(scope='module')
def digits(digits_zip):
    images, labels, _ = quickstart.load_labelled_images(digits_zip)
    train_idx, held_out_idx = quickstart.split_held_out(len(images), seed=0)
    classifier = quickstart.train_classifier(images[train_idx], labels[train_idx], num_classes=10, epochs=10)
    return images, labels, train_idx, held_out_idx, classifier


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
    images, labels, _, held_out_idx, classifier = digits
    features, probs = quickstart.classify(classifier, images[held_out_idx])
    assert features.shape == (len(held_out_idx), 64)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-6)
    accuracy = np.mean(probs.argmax(axis=1) == labels[held_out_idx])
    assert accuracy > 0.9
    assert quickstart.class_agreement(probs, labels[held_out_idx]) == pytest.approx(accuracy)


def test_fd_separates_real_digits_from_noise(digits):
    images, _, train_idx, held_out_idx, classifier = digits
    reference, _ = quickstart.classify(classifier, images[train_idx])
    real, real_probs = quickstart.classify(classifier, images[held_out_idx])
    noise_images = np.random.RandomState(0).randint(0, 256, size=images[held_out_idx].shape).astype(np.uint8)
    noise, _ = quickstart.classify(classifier, noise_images)
    fd_real, fd_noise = quickstart.frechet_distance(real, reference), quickstart.frechet_distance(noise, reference)
    assert fd_real < 0.1 * fd_noise
    assert quickstart.mean_confidence(real_probs) > 0.8


def test_frechet_distance_matches_scipy_formula():
    rng = np.random.RandomState(1)
    a = rng.randn(400, 6) @ rng.randn(6, 6)
    b = rng.randn(300, 6) @ rng.randn(6, 6) + 0.5
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * np.real(scipy.linalg.sqrtm(cov_a @ cov_b)))
    assert quickstart.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert quickstart.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)


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


def test_conditioned_classes_and_images_match_generate_images(tmp_path):
    net = tiny_precond(label_dim=10, frozen=True)
    seeds = [0, 1, 2, 7, 100, 12345]
    labels, images = [], []
    for r in generate_images.generate_images(net, outdir=str(tmp_path), seeds=seeds, max_batch_size=4, device='cpu',
                                             verbose=False, sampler_fn='euler', num_steps=2):
        labels.append(r.labels.argmax(dim=1))
        images.append(r.images)
    expected_classes = torch.cat(labels).numpy()
    assert len(set(expected_classes.tolist())) > 1
    classes = quickstart.conditioned_classes(seeds, label_dim=10, image_shape=[3, 8, 8], device='cpu')
    assert np.array_equal(classes, expected_classes)
    if not torch.cuda.is_available():  # the default device (torch_utils.misc.default_device) is then the CPU
        assert np.array_equal(quickstart.conditioned_classes(seeds, label_dim=10, image_shape=[3, 8, 8]), expected_classes)
    loaded = quickstart.load_generated(str(tmp_path), seeds)
    assert np.array_equal(loaded, torch.cat(images).numpy())


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    outdir = tmp_path / 'run'
    command = ['quickstart.py', f'--outdir={outdir}', '--quick', '--steps=2']
    result = run_script(*command, timeout=1200)
    for tag in ['teacher-heun', 'teacher-euler2', 'student2']:
        assert (outdir / f'grid-{tag}.png').stat().st_size > 0
    table_rows = ['real held-out digits', 'teacher Heun', 'teacher Euler, 2 steps', 'student, 2 steps']
    results = (outdir / 'results.md').read_text()
    for row in table_rows:
        assert f'| {row}' in result.stdout and f'| {row}' in results

    rerun = run_script(*command)
    assert rerun.stdout.count('skipping') == 7
    assert all(f'| {row}' in rerun.stdout for row in table_rows)
