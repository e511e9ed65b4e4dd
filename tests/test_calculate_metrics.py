"""Tests for calculate_metrics.py: Fréchet distance, statistics, the ref/calc/gen commands with tiny detectors."""

import inspect
import os
import pickle
import re

import click
import numpy as np
import PIL.Image
import pytest
import torch

import calculate_metrics
import dnnlib
from helpers import (assert_user_error, error_line, invoke, network_pickle, printed_value, run_script, save_pickle,
    tiny_precond)

EMPTY = inspect.Parameter.empty

# The tiny stand-ins for the Inception and DINOv2 detectors are conftest.py's `detectors`.


def write_pngs(folder, count, seed, brightness=1.0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        pixels = (rng.random([8, 8, 3]) * 255 * brightness).astype(np.uint8)
        PIL.Image.fromarray(pixels).save(os.path.join(folder, f'img{i:03d}.png'))
    return str(folder)


def features_of_folder(folder, models):
    """Detector features computed here, independently of calculate_metrics' pipeline."""
    files = sorted(os.listdir(folder))
    images = torch.as_tensor(np.stack([np.asarray(PIL.Image.open(os.path.join(folder, f))) for f in files])).permute(0, 3, 1, 2)
    with torch.no_grad():
        fid = models['fid'](images, return_features=True)
        x = torch.nn.functional.interpolate(images.float(), size=(224, 224), mode='bicubic', antialias=True) / 255
        x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        dino = models['fd_dinov2'](x)
    return {'fid': fid.double().numpy(), 'fd_dinov2': dino.double().numpy()}


def fd_by_eigenvalues(f, f_ref):
    """Fréchet distance of two feature sets; tr sqrt(S1 S2) from the eigenvalues of S1 S2."""
    mu, mu_ref = f.mean(0), f_ref.mean(0)
    s, s_ref = np.cov(f, rowvar=False), np.cov(f_ref, rowvar=False)
    root_trace = np.sqrt(np.clip(np.linalg.eigvals(s @ s_ref).real, 0, None)).sum()
    return np.sum((mu - mu_ref) ** 2) + np.trace(s) + np.trace(s_ref) - 2 * root_trace


#----------------------------------------------------------------------------

def test_frechet_distance_matches_direct_computation():
    rng = np.random.default_rng(0)
    f, f_ref = rng.normal(size=[50, 6]) @ rng.normal(size=[6, 6]), rng.normal(size=[40, 6]) * 2 + 0.5
    mu, mu_ref = f.mean(0), f_ref.mean(0)
    s, s_ref = np.cov(f, rowvar=False), np.cov(f_ref, rowvar=False)
    assert calculate_metrics.frechet_distance(mu, s, mu_ref, s_ref) == pytest.approx(fd_by_eigenvalues(f, f_ref), rel=1e-8)
    assert calculate_metrics.frechet_distance(mu, s, mu, s) == pytest.approx(0, abs=1e-8)
    # One dimension: (m1 - m2)^2 + (sd1 - sd2)^2.
    one_d = calculate_metrics.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]]))
    assert one_d == pytest.approx(4 + 1)


@pytest.fixture
def edm2_detectors(detectors, monkeypatch):
    """The tiny detectors installed as the standard ones, so that tests can call the API exactly as EDM2 users do."""
    models, paths = detectors
    for metric, detector_class in [('fid', calculate_metrics.InceptionV3Detector), ('fd_dinov2', calculate_metrics.DINOv2Detector)]:
        spec = dnnlib.EasyDict(detector_kwargs=dnnlib.EasyDict(class_name=detector_class, source=paths[metric]))
        monkeypatch.setitem(calculate_metrics.metric_specs, metric, spec)
    monkeypatch.setattr(calculate_metrics, '_detector_cache', {})
    return models


def test_edm2_signatures():
    # EDM2's parameter names and defaults; ours adds trailing keyword arguments (detector sources) and picks
    # the device itself (None: CUDA when available, else the CPU) where EDM2 defaults to CUDA.
    expected = {
        'get_detector': [('metric', EMPTY), ('verbose', True)],
        'load_stats': [('path', EMPTY), ('verbose', True)],
        'save_stats': [('stats', EMPTY), ('path', EMPTY), ('verbose', True)],
        'calculate_stats_for_iterable': [('image_iter', EMPTY), ('metrics', ['fid', 'fd_dinov2']), ('verbose', True),
                                         ('dest_path', None), ('device', None)],
        'calculate_stats_for_files': [('image_path', EMPTY), ('num_images', None), ('seed', 0), ('max_batch_size', 64),
                                      ('num_workers', 2), ('prefetch_factor', 2), ('verbose', True), ('stats_kwargs', EMPTY)],
        'calculate_metrics_from_stats': [('stats', EMPTY), ('ref', EMPTY), ('metrics', ['fid', 'fd_dinov2']), ('verbose', True)],
        'parse_metric_list': [('s', EMPTY)],
        'Detector': [('feature_dim', EMPTY)],
        'InceptionV3Detector': [],
        'DINOv2Detector': [('resize_mode', 'torch')],
    }
    for name, params in expected.items():
        actual = list(inspect.signature(getattr(calculate_metrics, name)).parameters.values())
        assert [(p.name, p.default) for p in actual[:len(params)]] == params, name
        assert all(p.default is not EMPTY for p in actual[len(params):]), name  # what ours adds is optional
    assert sorted(calculate_metrics.metric_specs) == ['fd_dinov2', 'fid']
    assert sorted(calculate_metrics.cmdline.commands) == ['calc', 'gen', 'ref']


def test_calculate_stats_for_iterable_yields_progress_and_final_stats(edm2_detectors, tmp_path):
    models = edm2_detectors
    rng = np.random.default_rng(1)
    images = torch.as_tensor(rng.integers(0, 256, size=[11, 3, 8, 8], dtype=np.uint8))
    labels = torch.zeros([11, 10])
    # The kinds of batches EDM2 accepts: images, (images, labels) as a DataLoader gives, generate_images() results.
    batches = [images[:4], (images[4:5], labels[4:5]), dnnlib.EasyDict(images=images[5:9]), images[9:].numpy()]
    dest_path = str(tmp_path / 'refs' / 'stats.pkl')
    stats_iter = calculate_metrics.calculate_stats_for_iterable(batches, ['fid'], False, dest_path, 'cpu')
    assert len(stats_iter) == 4
    results = list(stats_iter)
    assert [sorted(r) for r in results] == [['batch_idx', 'images', 'num_batches', 'num_images', 'stats']] * 4
    assert [(r.batch_idx, r.num_batches, r.num_images) for r in results] == [(0, 4, 4), (1, 4, 5), (2, 4, 9), (3, 4, 11)]
    assert all(r.stats is None for r in results[:-1])
    assert torch.equal(torch.cat([r.images for r in results]), images)

    stats = results[-1].stats
    features = models['fid'](images, return_features=True).detach().double().numpy()
    assert type(stats) is dict and list(stats) == ['num_images', 'fid'] and stats['num_images'] == 11
    assert stats['fid']['mu'].dtype == np.float64 and stats['fid']['sigma'].shape == (5, 5)
    np.testing.assert_allclose(stats['fid']['mu'], features.mean(0), rtol=1e-6, atol=1e-7)  # float32 features vary with batching
    np.testing.assert_allclose(stats['fid']['sigma'], np.cov(features, rowvar=False), rtol=1e-6, atol=1e-7)
    with open(dest_path, 'rb') as f:
        saved = pickle.load(f)
    assert list(saved) == ['num_images', 'fid'] and np.array_equal(saved['fid']['sigma'], stats['fid']['sigma'])
    assert os.listdir(tmp_path / 'refs') == ['stats.pkl']

    # A plain generator has no length: the statistics still come with its last batch.
    again = list(calculate_metrics.calculate_stats_for_iterable((b for b in batches), metrics=['fid'], verbose=False, device='cpu'))
    assert again[-1].num_batches is None and np.array_equal(again[-1].stats['fid']['mu'], stats['fid']['mu'])


def test_calculate_stats_for_files_matches_features_of_folder(edm2_detectors, tmp_path):
    folder = write_pngs(tmp_path / 'images', 7, seed=7)
    stats_iter = calculate_metrics.calculate_stats_for_files(folder, max_batch_size=3, num_workers=0, verbose=False, device='cpu')
    results = list(stats_iter)
    assert len(stats_iter) == len(results) == 3 and [r.num_images for r in results] == [3, 5, 7]
    expected = features_of_folder(folder, edm2_detectors)
    for metric in ('fid', 'fd_dinov2'):
        np.testing.assert_allclose(results[-1].stats[metric]['mu'], expected[metric].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(results[-1].stats[metric]['sigma'], np.cov(expected[metric], rowvar=False), rtol=1e-4, atol=1e-7)


def test_calculate_metrics_from_stats_loads_a_ref_path_and_skips_missing_metrics(tmp_path, capsys):
    rng = np.random.default_rng(8)
    f, f_ref = rng.normal(size=[30, 3]), rng.normal(size=[25, 3]) + 0.4
    fit = lambda x: dict(mu=x.mean(0), sigma=np.cov(x, rowvar=False))
    ref_path = str(tmp_path / 'ref.pkl')
    calculate_metrics.save_stats(dict(num_images=25, fid=fit(f_ref)), ref_path)
    results = calculate_metrics.calculate_metrics_from_stats(dict(num_images=30, fid=fit(f), fd_dinov2=fit(f)), ref_path)
    assert list(results) == ['fid'] and results['fid'] == pytest.approx(fd_by_eigenvalues(f, f_ref), rel=1e-8)
    printed = capsys.readouterr().out
    assert ref_path in printed and 'fd_dinov2' in printed and printed_value(printed, 'fid') == pytest.approx(results['fid'], rel=1e-5)
    assert calculate_metrics.calculate_metrics_from_stats(dict(fid=fit(f)), calculate_metrics.load_stats(ref_path, False), ['fid'], False) == results


def test_save_stats_replaces_the_file_atomically(tmp_path, monkeypatch):
    path = str(tmp_path / 'stats.pkl')
    old = {'num_images': 2, 'fid': dict(mu=np.zeros(2), sigma=np.eye(2))}
    calculate_metrics.save_stats(old, path, verbose=False)

    def broken_dump(obj, f):
        f.write(b'half a pickle')
        raise OSError('disk full')
    monkeypatch.setattr(pickle, 'dump', broken_dump)
    with pytest.raises(OSError, match='disk full'):
        calculate_metrics.save_stats({'num_images': 3}, path, verbose=False)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ['stats.pkl'] and calculate_metrics.load_stats(path, verbose=False)['num_images'] == 2


def test_get_detector_builds_once_per_metric(edm2_detectors):
    fid = calculate_metrics.get_detector('fid', False)
    assert calculate_metrics.get_detector('fid') is fid and isinstance(fid, calculate_metrics.Detector)
    assert fid.feature_dim == 2048 and calculate_metrics.get_detector('fd_dinov2', False).feature_dim == 1024
    with pytest.raises(ValueError, match='kid'):
        calculate_metrics.get_detector('kid')


def test_dinov2_pil_resize_mode(detectors):
    models, paths = detectors
    images = torch.as_tensor(np.random.default_rng(9).integers(0, 256, size=[2, 3, 8, 8], dtype=np.uint8))
    detector = calculate_metrics.DINOv2Detector('pil', source=paths['fd_dinov2'])
    resized = np.stack([np.asarray(PIL.Image.fromarray(image).resize((224, 224), PIL.Image.Resampling.BICUBIC))
                        for image in images.permute(0, 2, 3, 1).numpy()])
    x = torch.as_tensor(resized).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(detector(images), models['fd_dinov2'](x), atol=1e-6)
    with pytest.raises(ValueError, match='resize_mode'):
        calculate_metrics.DINOv2Detector('nearest', source=paths['fd_dinov2'])


def test_default_dinov2_source_is_a_pinned_commit(tmp_path, monkeypatch):
    assert re.fullmatch(r'[0-9a-f]{40}', calculate_metrics.DINOV2_COMMIT)
    assert calculate_metrics.DINOv2Detector.default_source == 'facebookresearch/dinov2:' + calculate_metrics.DINOV2_COMMIT
    calls = []
    monkeypatch.setattr(torch.hub, 'load', lambda *args, **kwargs: calls.append((args, kwargs)) or torch.nn.Identity())
    monkeypatch.setattr(torch.hub, '_hub_dir', getattr(torch.hub, '_hub_dir', None))  # undo set_dir() afterwards
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path))
    calculate_metrics.DINOv2Detector()  # torch.hub.load is replaced: nothing is downloaded
    assert calls == [(('facebookresearch/dinov2:' + calculate_metrics.DINOV2_COMMIT, 'dinov2_vitl14'),
                      dict(source='github', trust_repo=True, verbose=False, skip_validation=True))]
    assert torch.hub.get_dir() == str(tmp_path / 'torch_hub')


def test_parse_metric_list():
    assert calculate_metrics.parse_metric_list('fid,fd_dinov2') == ['fid', 'fd_dinov2']
    assert calculate_metrics.parse_metric_list(['fd_dinov2']) == ['fd_dinov2']
    with pytest.raises(click.ClickException, match='kid'):
        calculate_metrics.parse_metric_list('fid,kid')


def test_npz_reference_is_read_as_fid(tmp_path):
    path = str(tmp_path / 'ref.npz')
    np.savez(path, mu=np.arange(3.0), sigma=np.eye(3))
    ref = calculate_metrics.load_stats(path, verbose=False)
    assert list(ref) == ['fid']
    np.testing.assert_array_equal(ref['fid']['mu'], np.arange(3.0))


@pytest.mark.slow
def test_ref_then_calc_on_png_folders(tmp_path, detectors):
    models, paths = detectors
    ref_dir = write_pngs(tmp_path / 'ref_images', 14, seed=2)
    gen_dir = write_pngs(tmp_path / 'gen_images' / 'nested', 12, seed=3, brightness=0.7)
    detector_args = [f'--detector=fid={paths["fid"]}', f'--detector=fd_dinov2={paths["fd_dinov2"]}']
    ref_path = str(tmp_path / 'refs' / 'ref.pkl')
    run_script('calculate_metrics.py', 'ref', f'--data={ref_dir}', f'--dest={ref_path}', '--batch=5', '--workers=0', *detector_args)

    with open(ref_path, 'rb') as f:
        ref = pickle.load(f)
    assert type(ref) is dict and list(ref) == ['num_images', 'fid', 'fd_dinov2'] and ref['num_images'] == 14
    ref_features = features_of_folder(ref_dir, models)
    for metric in ('fid', 'fd_dinov2'):
        np.testing.assert_allclose(ref[metric]['mu'], ref_features[metric].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ref[metric]['sigma'], np.cov(ref_features[metric], rowvar=False), rtol=1e-4, atol=1e-7)

    proc = run_script('calculate_metrics.py', 'calc', f'--images={tmp_path / "gen_images"}', f'--ref={ref_path}', '--num=12',
                      '--batch=4', '--workers=1', *detector_args)
    gen_features = features_of_folder(gen_dir, models)
    for metric in ('fid', 'fd_dinov2'):
        expected = fd_by_eigenvalues(gen_features[metric], ref_features[metric])
        assert expected > 1e-3
        assert printed_value(proc.stdout, metric) == pytest.approx(expected, rel=1e-3)



def test_num_images_picks_a_seeded_subset_and_needs_enough_images(tmp_path, edm2_detectors):
    folder = write_pngs(tmp_path / 'images', 7, seed=6)

    def subset(seed):
        results = calculate_metrics.calculate_stats_for_files(folder, 4, seed, 3, 0, metrics=['fid'], verbose=False, device='cpu')
        return torch.cat([r.images for r in results])
    assert subset(0).shape == (4, 3, 8, 8) and torch.equal(subset(0), subset(0))
    assert not all(torch.equal(subset(0), subset(seed)) for seed in range(1, 4))
    with pytest.raises(calculate_metrics.MetricsError, match=r'7 images, fewer than the 8'):
        calculate_metrics.calculate_stats_for_files(folder, num_images=8, num_workers=0, verbose=False)


def test_unreachable_detector_names_url_and_local_option(tmp_path, subprocess_env):
    url = 'http://127.0.0.1:9/metrics/inception-2015-12-05.pkl'  # the discard port: nothing listens there
    subprocess_env['DNNLIB_CACHE_DIR'] = str(tmp_path / 'cache')
    with pytest.raises(calculate_metrics.DetectorUnavailable) as info:
        calculate_metrics.InceptionV3Detector(url)
    assert url in str(info.value) and '--detector=fid=' in str(info.value)

    images = write_pngs(tmp_path / 'images', 3, seed=4)
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(2), sigma=np.eye(2))
    proc = run_script('calculate_metrics.py', 'calc', f'--images={images}', f'--ref={tmp_path / "ref.npz"}', '--metrics=fid',
                      '--num=3', '--workers=0', f'--detector=fid={url}', env=subprocess_env, check=False)
    assert proc.returncode != 0 and url in proc.stderr and '--detector=fid=' in proc.stderr and 'Traceback' not in proc.stderr


def test_bad_metric_and_detector_options(tmp_path):
    result = invoke(calculate_metrics.cmdline, 'ref', f'--data={tmp_path}', f'--dest={tmp_path}/x.pkl', '--metrics=fid,kid')
    assert result.exit_code != 0 and 'kid' in result.output
    result = invoke(calculate_metrics.cmdline, 'ref', f'--data={tmp_path}', f'--dest={tmp_path}/x.pkl', '--detector=inception.pkl')
    assert result.exit_code != 0 and 'METRIC=' in result.output


@pytest.mark.slow
def test_gen_with_student_pickle(tmp_path, detectors):
    import generate_images
    from training.encoders import StandardRGBEncoder
    models, paths = detectors
    net = tiny_precond(frozen=True)
    net_path = save_pickle(network_pickle(net, cd=dict(S=2, sigma_min=0.002, sigma_max=80.0, rho=7.0)), tmp_path / 'student.pkl')
    ref_dir = write_pngs(tmp_path / 'ref_images', 10, seed=5)
    ref_path = str(tmp_path / 'ref.pkl')
    run_script('calculate_metrics.py', 'ref', f'--data={ref_dir}', f'--dest={ref_path}', '--metrics=fid', '--workers=0',
               f'--detector=fid={paths["fid"]}')
    proc = run_script('calculate_metrics.py', 'gen', f'--net={net_path}', f'--ref={ref_path}', '--metrics=fid', '--num=9',
                      '--seed=3', '--batch=4', f'--detector=fid={paths["fid"]}')

    rnd = generate_images.StackedRandomGenerator('cpu', range(3, 12))
    with torch.no_grad():
        images = StandardRGBEncoder().decode(generate_images.consistency_sampler(net, rnd.randn([9, 3, 8, 8]), num_steps=2))
        features = models['fid'](images, return_features=True).double().numpy()
    expected = fd_by_eigenvalues(features, features_of_folder(ref_dir, models)['fid'])
    assert printed_value(proc.stdout, 'fid') == pytest.approx(expected, rel=1e-3)

#----------------------------------------------------------------------------
# Unreadable inputs: one line naming the file, a failing exit status, nothing written.

@pytest.fixture
def in_process(monkeypatch, no_process_group):
    """Run the commands with CliRunner: no process group, no global start method, a fresh detector cache."""
    monkeypatch.setattr(torch.multiprocessing, 'set_start_method', lambda *args, **kwargs: None)
    monkeypatch.setattr(calculate_metrics, '_detector_cache', {})


def test_calc_refuses_unreadable_reference_statistics(tmp_path, detectors, in_process):
    _models, paths = detectors
    images = write_pngs(tmp_path / 'images', 3, seed=10)
    refs = tmp_path / 'refs'
    refs.mkdir()
    good = dict(mu=np.zeros(5), sigma=np.eye(5))
    pickles = {'list.pkl': [1, 2], 'no_metrics.pkl': {'num_images': 3}, 'no_sigma.pkl': {'fid': dict(mu=np.zeros(5))},
               'nan.pkl': {'fid': dict(mu=np.full(5, np.nan), sigma=np.eye(5))}, 'shapes.pkl': {'fid': dict(mu=np.zeros(5), sigma=np.eye(4))},
               'words.pkl': {'fid': dict(mu='zero', sigma=np.eye(5))}}
    for name, obj in pickles.items():
        (refs / name).write_bytes(pickle.dumps(obj))
    (refs / 'empty.pkl').write_bytes(b'')
    (refs / 'random.pkl').write_bytes(np.random.default_rng(1).bytes(3000))
    (refs / 'half.pkl').write_bytes(pickle.dumps({'fid': good})[:200])
    (refs / 'empty.npz').write_bytes(b'')
    (refs / 'random.npz').write_bytes(np.random.default_rng(2).bytes(3000))
    np.savez(refs / 'other.npz', mean=np.zeros(5), cov=np.eye(5))
    (refs / 'zip.pkl').write_bytes((refs / 'other.npz').read_bytes())  # the unpickler's message on a ZIP has a line break
    np.save(refs / 'single.npy', np.zeros(5))
    os.rename(refs / 'single.npy', refs / 'single.npz')
    (refs / 'folder.pkl').mkdir()
    cases = {'missing.pkl': 'does not exist', 'folder.pkl': 'is a directory', 'empty.pkl': 'empty or truncated',
             'random.pkl': 'not a readable pickle', 'zip.pkl': 'not a readable pickle', 'half.pkl': 'truncated', 'list.pkl': 'not a statistics file; expected a dict',
             'no_metrics.pkl': 'holds no statistics of fd_dinov2 or fid', 'no_sigma.pkl': 'the fid entry is not a dict with "mu" and "sigma"',
             'nan.pkl': 'NaN or inf', 'shapes.pkl': 'expected [D] and [D, D]', 'words.pkl': 'not numeric arrays',
             'empty.npz': 'empty or truncated', 'random.npz': 'not a readable .npz file', 'other.npz': 'has no mu and sigma array',
             'single.npz': 'not an .npz archive'}
    before = sorted(os.listdir(tmp_path))
    for name, why in cases.items():
        result = invoke(calculate_metrics.cmdline, 'calc', f'--images={images}', f'--ref={refs / name}', '--metrics=fid', '--num=3', '--workers=0',
                        f'--detector=fid={paths["fid"]}')
        assert_user_error(result, f'--ref: {refs / name}', why)
    # Statistics of another detector: the feature dimensions differ.
    np.savez(refs / 'three.npz', mu=np.zeros(3), sigma=np.eye(3))
    result = invoke(calculate_metrics.cmdline, 'calc', f'--images={images}', f'--ref={refs / "three.npz"}', '--metrics=fid', '--num=3', '--workers=0',
                    f'--detector=fid={paths["fid"]}')
    assert_user_error(result, 'fid: the features have 5 dimensions but the reference statistics 3')
    assert sorted(os.listdir(tmp_path)) == before


def test_unreadable_image_sets_are_one_line_and_write_no_statistics(tmp_path, detectors, in_process):
    _models, paths = detectors
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(5), sigma=np.eye(5))
    empty = tmp_path / 'empty'
    empty.mkdir()
    late = write_pngs(tmp_path / 'late', 4, seed=11)
    (tmp_path / 'late' / 'img999.png').write_bytes(b'\x89PNG\r\n\x1a\n and then nothing of an image')
    early = write_pngs(tmp_path / 'early', 3, seed=12)
    (tmp_path / 'early' / 'img000.png').write_bytes(b'')
    cases = [(tmp_path / 'missing', [str(tmp_path / 'missing')]), (empty, [str(empty)]),
             (late, ['img999.png', late]), (early, ['img000.png', early])]
    detector = f'--detector=fid={paths["fid"]}'
    for folder, fragments in cases:
        result = invoke(calculate_metrics.cmdline, 'calc', f'--images={folder}', f'--ref={tmp_path / "ref.npz"}', '--metrics=fid', '--batch=2',
                        f'--num={5 if folder == late else 3}', '--workers=0', detector)  # all of a folder's images
        assert_user_error(result, *map(str, fragments))
        dest = tmp_path / 'refs' / 'ref.pkl'
        result = invoke(calculate_metrics.cmdline, 'ref', f'--data={folder}', f'--dest={dest}', '--metrics=fid', '--batch=2', '--workers=0', detector)
        assert_user_error(result, *map(str, fragments))
        assert not (tmp_path / 'refs').exists()
    result = invoke(calculate_metrics.cmdline, 'calc', f'--images={late}', f'--ref={tmp_path / "ref.npz"}', '--metrics=fid', '--num=9', '--workers=0', detector)
    assert_user_error(result, '5 images, fewer than the 9')


def test_corrupt_image_read_by_a_worker_is_one_line(tmp_path, detectors):
    _models, paths = detectors
    folder = write_pngs(tmp_path / 'images', 4, seed=13)
    (tmp_path / 'images' / 'img999.png').write_bytes(os.urandom(500))
    dest = tmp_path / 'refs' / 'ref.pkl'
    proc = run_script('calculate_metrics.py', 'ref', f'--data={folder}', f'--dest={dest}', '--metrics=fid', '--batch=2',
                      '--workers=1', f'--detector=fid={paths["fid"]}', check=False)
    assert proc.returncode == 1 and 'img999.png' in error_line(proc.stderr)
    assert not (tmp_path / 'refs').exists()


def test_unloadable_detector_files_are_one_line(tmp_path, in_process):
    images = write_pngs(tmp_path / 'images', 3, seed=14)
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(5), sigma=np.eye(5))
    (tmp_path / 'empty.pkl').write_bytes(b'')
    (tmp_path / 'random.pkl').write_bytes(np.random.default_rng(3).bytes(2000))
    (tmp_path / 'list.pkl').write_bytes(pickle.dumps([1, 2]))
    cases = {'missing.pkl': 'Could not load the fid detector', 'empty.pkl': 'empty or truncated',
             'random.pkl': 'not a readable pickle', 'list.pkl': 'holds a list, not a torch module',
             'ref.npz': 'not a readable pickle'}  # a ZIP: the unpickler's message has a line break
    before = sorted(os.listdir(tmp_path))
    for name, why in cases.items():
        result = invoke(calculate_metrics.cmdline, 'calc', f'--images={images}', f'--ref={tmp_path / "ref.npz"}', '--metrics=fid', '--num=3', '--workers=0',
                        f'--detector=fid={tmp_path / name}')
        assert_user_error(result, str(tmp_path / name), why)
    assert sorted(os.listdir(tmp_path)) == before


def test_gen_refuses_bad_network_pickles(tmp_path, detectors, in_process):
    _models, paths = detectors
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(5), sigma=np.eye(5))
    (tmp_path / 'empty.pkl').write_bytes(b'')
    (tmp_path / 'random.pkl').write_bytes(np.random.default_rng(4).bytes(2000))
    (tmp_path / 'list.pkl').write_bytes(pickle.dumps([1, 2]))
    cases = {'missing.pkl': 'does not exist', 'empty.pkl': 'empty or truncated', 'random.pkl': 'not a readable pickle',
             'list.pkl': 'not a network pickle'}
    before = sorted(os.listdir(tmp_path))
    for name, why in cases.items():
        result = invoke(calculate_metrics.cmdline, 'gen', f'--net={tmp_path / name}', f'--ref={tmp_path / "ref.npz"}', '--metrics=fid', '--num=2',
                        f'--detector=fid={paths["fid"]}')
        assert_user_error(result, f'--net: {tmp_path / name}', why)
    assert sorted(os.listdir(tmp_path)) == before

#----------------------------------------------------------------------------
# Metrics fd_<name> of a feature network given as a file (here the quickstart's digit classifier, untrained:
# a persistent module, so its pickle carries its source and loads in the scripts' own processes).

@pytest.fixture(scope='module')
def feature_network(tmp_path_factory):
    """(module, path of its pickle) of a feature network mapping uint8 NCHW RGB images to [N, 6] features."""
    from training.digit_features import DigitClassifier
    torch.manual_seed(5)
    net = DigitClassifier(num_classes=3, feature_dim=6).eval().requires_grad_(False)
    with torch.no_grad():
        net.trunk[-2].weight.mul_(100)  # features of order 0.1 (fresh weights give order 0.001)
    return net, save_pickle(net, tmp_path_factory.mktemp('feature_network') / 'tiny-features.pkl')


def network_features(folder, net):
    files = sorted(os.listdir(folder))
    images = torch.as_tensor(np.stack([np.asarray(PIL.Image.open(os.path.join(folder, f))) for f in files])).permute(0, 3, 1, 2)
    with torch.no_grad():
        return net(images).double().numpy()


def test_custom_metric_names_and_detector_options():
    assert calculate_metrics.parse_metric_list('fid,fd_digits') == ['fid', 'fd_digits']
    assert calculate_metrics.parse_detector_sources(None, None, ['fd_digits=a/b.pkl', 'fid=c.pkl']) == \
        {'fd_digits': 'a/b.pkl', 'fid': 'c.pkl'}
    for bad in ['fd_', 'fdx', 'fd_-x', 'kid']:
        with pytest.raises(click.BadParameter, match='fd_<name>'):
            calculate_metrics.parse_metric_list(bad)
        with pytest.raises(click.BadParameter, match='fd_<name>'):
            calculate_metrics.parse_detector_sources(None, None, [f'{bad}=x.pkl'])
    assert calculate_metrics.is_custom_metric('fd_digits') and not calculate_metrics.is_custom_metric('fd_dinov2')
    assert sorted(calculate_metrics.metric_specs) == ['fd_dinov2', 'fid']  # the registry stays EDM2's


def test_custom_metric_through_the_edm2_api(feature_network, tmp_path, monkeypatch):
    net, path = feature_network
    monkeypatch.setattr(calculate_metrics, '_detector_cache', {})
    detector = calculate_metrics.get_detector('fd_tiny', False, source=path)
    assert isinstance(detector, calculate_metrics.FeatureNetworkDetector) and detector.feature_dim == 6
    assert calculate_metrics.get_detector('fd_tiny', False, source=path) is detector
    images = torch.as_tensor(np.random.default_rng(3).integers(0, 256, size=[9, 3, 8, 8], dtype=np.uint8))
    dest = str(tmp_path / 'refs.pkl')
    results = list(calculate_metrics.calculate_stats_for_iterable([images[:5], images[5:]], ['fd_tiny'], False, dest, 'cpu',
        detector_sources={'fd_tiny': path}))
    features = net(images).double().numpy()
    stats = results[-1].stats
    assert list(stats) == ['num_images', 'fd_tiny']
    np.testing.assert_allclose(stats['fd_tiny']['mu'], features.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats['fd_tiny']['sigma'], np.cov(features, rowvar=False), rtol=1e-5, atol=1e-7)
    assert list(calculate_metrics.load_stats(dest, verbose=False)) == ['num_images', 'fd_tiny']
    with pytest.raises(calculate_metrics.DetectorUnavailable, match=r'fd_tiny is not a built-in metric.*--detector=fd_tiny=PATH'):
        calculate_metrics.get_detector('fd_tiny', False)


def test_custom_metric_detector_must_give_one_feature_row_per_image(tmp_path, monkeypatch):
    path = save_pickle(torch.nn.Flatten(0), tmp_path / 'flat.pkl')  # a torch module, but [N*C*H*W] output
    monkeypatch.setattr(calculate_metrics, '_detector_cache', {})
    images = torch.zeros([2, 3, 4, 4], dtype=torch.uint8)
    with pytest.raises(calculate_metrics.MetricsError, match=r'fd_flat detector returned shape \[96\] for 2 images'):
        list(calculate_metrics.calculate_stats_for_iterable([images], ['fd_flat'], False, device='cpu',
            detector_sources={'fd_flat': path}))


@pytest.mark.slow
def test_ref_then_calc_with_a_custom_metric(tmp_path, feature_network, detectors):
    net, path = feature_network
    models, paths = detectors
    ref_dir = write_pngs(tmp_path / 'ref_images', 14, seed=20)
    gen_dir = write_pngs(tmp_path / 'gen_images', 12, seed=21, brightness=0.6)
    ref_path = str(tmp_path / 'refs' / 'ref.pkl')
    detector_args = [f'--detector=fd_tiny={path}', f'--detector=fid={paths["fid"]}']
    run_script('calculate_metrics.py', 'ref', f'--data={ref_dir}', f'--dest={ref_path}', '--metrics=fd_tiny,fid', '--batch=5',
               '--workers=0', *detector_args)
    ref = calculate_metrics.load_stats(ref_path, verbose=False)
    assert list(ref) == ['num_images', 'fd_tiny', 'fid'] and ref['fd_tiny']['mu'].shape == (6,)
    ref_features = network_features(ref_dir, net)
    np.testing.assert_allclose(ref['fd_tiny']['mu'], ref_features.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref['fd_tiny']['sigma'], np.cov(ref_features, rowvar=False), rtol=1e-4, atol=1e-7)

    proc = run_script('calculate_metrics.py', 'calc', f'--images={gen_dir}', f'--ref={ref_path}', '--metrics=fd_tiny,fid',
                      '--num=12', '--batch=4', '--workers=1', *detector_args)
    expected = fd_by_eigenvalues(network_features(gen_dir, net), ref_features)
    assert expected > 1e-3
    assert printed_value(proc.stdout, 'fd_tiny') == pytest.approx(expected, rel=1e-3)
    assert printed_value(proc.stdout, 'fid') == pytest.approx(
        fd_by_eigenvalues(features_of_folder(gen_dir, models)['fid'], features_of_folder(ref_dir, models)['fid']), rel=1e-3)


def test_gen_with_a_custom_metric(tmp_path, feature_network, in_process):
    net, path = feature_network
    import generate_images
    from training.encoders import StandardRGBEncoder
    student = tiny_precond(frozen=True)
    net_path = save_pickle(network_pickle(student, cd=dict(S=2, sigma_min=0.002, sigma_max=80.0, rho=7.0)), tmp_path / 'student.pkl')
    ref_dir = write_pngs(tmp_path / 'ref_images', 10, seed=22)
    ref_path = tmp_path / 'ref.pkl'
    result = invoke(calculate_metrics.cmdline, 'ref', f'--data={ref_dir}', f'--dest={ref_path}', '--metrics=fd_tiny', '--workers=0',
                    f'--detector=fd_tiny={path}')
    assert result.exit_code == 0, result.output
    result = invoke(calculate_metrics.cmdline, 'gen', f'--net={net_path}', f'--ref={ref_path}', '--metrics=fd_tiny', '--num=9',
                    '--seed=3', '--batch=4', f'--detector=fd_tiny={path}')
    assert result.exit_code == 0, result.output
    rnd = generate_images.StackedRandomGenerator('cpu', range(3, 12))
    with torch.no_grad():
        images = StandardRGBEncoder().decode(generate_images.consistency_sampler(student, rnd.randn([9, 3, 8, 8]), num_steps=2))
        features = net(images).double().numpy()
    expected = fd_by_eigenvalues(features, network_features(ref_dir, net))
    assert printed_value(result.stdout, 'fd_tiny') == pytest.approx(expected, rel=1e-3)


def test_custom_metric_without_its_detector_is_one_line(tmp_path, feature_network, data16, in_process):
    _net, path = feature_network
    images = write_pngs(tmp_path / 'images', 3, seed=23)
    stats = {'num_images': 3, 'fd_tiny': dict(mu=np.zeros(6), sigma=np.eye(6))}
    ref_path = str(tmp_path / 'ref.pkl')
    calculate_metrics.save_stats(stats, ref_path, verbose=False)
    before = sorted(os.listdir(tmp_path))
    commands = [['ref', f'--data={images}', f'--dest={tmp_path / "refs" / "new.pkl"}', '--workers=0'],
                ['calc', f'--images={images}', f'--ref={ref_path}', '--num=3', '--workers=0'],
                ['gen', f'--net={tmp_path / "never-loaded.pkl"}', f'--ref={ref_path}', '--num=3']]
    for command in commands:
        result = invoke(calculate_metrics.cmdline, *command, '--metrics=fd_tiny')
        assert_user_error(result, 'fd_tiny', '--detector=fd_tiny=PATH')
        # Another metric's detector does not stand in for it.
        result = invoke(calculate_metrics.cmdline, *command, '--metrics=fd_tiny,fd_other', f'--detector=fd_tiny={path}')
        assert_user_error(result, 'fd_other', '--detector=fd_other=PATH')
    assert sorted(os.listdir(tmp_path)) == before

    # Validation while training: train_edm2.py parses --detector with parse_detector_sources.
    import train_edm2
    run_dir = tmp_path / 'run'
    args = [f'--outdir={run_dir}', f'--data={data16}', '--cond=False', '--preset=tiny-img16', f'--val_ref={ref_path}',
            '--val_metrics=fd_tiny', '--val_num=4', '--dry-run']
    result = invoke(train_edm2.cmdline, *args)
    assert_user_error(result, 'fd_tiny', '--detector=fd_tiny=PATH', exit_code=2)
    result = invoke(train_edm2.cmdline, *args, '--detector=fd_tiny')
    assert_user_error(result, 'fd_tiny', 'METRIC=PATH', exit_code=2)
    assert not run_dir.exists()
    result = invoke(train_edm2.cmdline, *args, f'--detector=fd_tiny={path}')
    assert result.exit_code == 0 and 'Dry run' in result.output, result.output
