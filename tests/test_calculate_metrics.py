"""Tests for calculate_metrics.py: Fréchet distance, statistics, the ref/calc/gen commands with tiny detectors."""

import importlib
import os
import pickle
import re
import subprocess
import sys

import click
import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import calculate_metrics

# Stand-ins for the Inception and DINOv2 detectors: persistent modules, so their pickles carry their own
# source and load anywhere, like the official Inception pickle.
DETECTOR_SOURCE = '''
import torch
from torch_utils import persistence


@persistence.persistent_class
class PooledProjection(torch.nn.Module):
    def __init__(self, num_features, seed, takes_uint8):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn([num_features, 12], generator=torch.Generator().manual_seed(seed)))
        self.takes_uint8 = takes_uint8

    def forward(self, images, return_features=False):
        if self.takes_uint8:
            assert images.dtype == torch.uint8 and return_features
            images = images.to(torch.float32) / 255
        else:
            assert images.dtype == torch.float32 and images.shape[2:] == (224, 224)
        pooled = torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1)
        return torch.tanh(pooled @ self.weight.T)
'''


@pytest.fixture(scope='module')
def detectors(tmp_path_factory):
    root = tmp_path_factory.mktemp('detectors')
    (root / 'tiny_metric_detectors.py').write_text(DETECTOR_SOURCE)
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module('tiny_metric_detectors')
    finally:
        sys.path.remove(str(root))
    models = {'fid': module.PooledProjection(5, seed=0, takes_uint8=True),
              'fd_dinov2': module.PooledProjection(4, seed=1, takes_uint8=False)}
    paths = {}
    for metric, model in models.items():
        paths[metric] = str(root / f'{metric}.pkl')
        with open(paths[metric], 'wb') as f:
            pickle.dump(model, f)
    return models, paths


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


def run_cli(args, env, cwd, check=True):
    proc = subprocess.run([sys.executable, 'calculate_metrics.py', *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def printed_metric(stdout, metric):
    match = re.search(rf'^{metric} = (\S+)$', stdout, re.MULTILINE)
    assert match, stdout
    return float(match.group(1))

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


def test_compute_stats_matches_numpy(detectors):
    models, paths = detectors
    rng = np.random.default_rng(1)
    images = torch.as_tensor(rng.integers(0, 256, size=[11, 3, 8, 8], dtype=np.uint8))
    batches = [images[:4], images[4:5], images[5:]]
    stats = calculate_metrics.compute_stats(batches, ['fid'], {'fid': paths['fid']}, device='cpu', verbose=False)
    features = models['fid'](images, return_features=True).detach().double().numpy()
    assert stats['num_images'] == 11 and set(stats) == {'num_images', 'fid'}
    assert stats['fid']['mu'].dtype == np.float64 and stats['fid']['sigma'].shape == (5, 5)
    np.testing.assert_allclose(stats['fid']['mu'], features.mean(0), rtol=1e-6, atol=1e-7)  # float32 features vary with batching
    np.testing.assert_allclose(stats['fid']['sigma'], np.cov(features, rowvar=False), rtol=1e-6, atol=1e-7)


def test_npz_reference_is_read_as_fid(tmp_path):
    path = str(tmp_path / 'ref.npz')
    np.savez(path, mu=np.arange(3.0), sigma=np.eye(3))
    ref = calculate_metrics.load_stats(path, verbose=False)
    assert list(ref) == ['fid']
    np.testing.assert_array_equal(ref['fid']['mu'], np.arange(3.0))


@pytest.mark.slow
def test_ref_then_calc_on_png_folders(tmp_path, detectors, repo_root, subprocess_env):
    models, paths = detectors
    ref_dir = write_pngs(tmp_path / 'ref_images', 14, seed=2)
    gen_dir = write_pngs(tmp_path / 'gen_images' / 'nested', 12, seed=3, brightness=0.7)
    detector_args = [f'--detector=fid={paths["fid"]}', f'--detector=fd_dinov2={paths["fd_dinov2"]}']
    ref_path = str(tmp_path / 'refs' / 'ref.pkl')
    run_cli(['ref', f'--data={ref_dir}', f'--dest={ref_path}', '--batch=5', '--workers=0', *detector_args],
            subprocess_env, repo_root)

    with open(ref_path, 'rb') as f:
        ref = pickle.load(f)
    assert type(ref) is dict and list(ref) == ['num_images', 'fid', 'fd_dinov2'] and ref['num_images'] == 14
    ref_features = features_of_folder(ref_dir, models)
    for metric in ('fid', 'fd_dinov2'):
        np.testing.assert_allclose(ref[metric]['mu'], ref_features[metric].mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ref[metric]['sigma'], np.cov(ref_features[metric], rowvar=False), rtol=1e-4, atol=1e-7)

    proc = run_cli(['calc', f'--images={tmp_path / "gen_images"}', f'--ref={ref_path}', '--num=12', '--batch=4', '--workers=1',
                    *detector_args], subprocess_env, repo_root)
    gen_features = features_of_folder(gen_dir, models)
    for metric in ('fid', 'fd_dinov2'):
        expected = fd_by_eigenvalues(gen_features[metric], ref_features[metric])
        assert expected > 1e-3
        assert printed_metric(proc.stdout, metric) == pytest.approx(expected, rel=1e-3)



def test_num_picks_a_seeded_subset_and_needs_enough_images(tmp_path):
    folder = write_pngs(tmp_path / 'images', 7, seed=6)
    subset = lambda seed: torch.cat(list(calculate_metrics.dataset_batches(folder, num=4, seed=seed, max_batch_size=3, num_workers=0, verbose=False)))
    assert subset(0).shape == (4, 3, 8, 8) and torch.equal(subset(0), subset(0))
    assert not all(torch.equal(subset(0), subset(seed)) for seed in range(1, 4))
    with pytest.raises(click.ClickException, match=r'7 images, fewer than --num=8'):
        list(calculate_metrics.dataset_batches(folder, num=8, num_workers=0, verbose=False))


def test_unreachable_detector_names_url_and_local_option(tmp_path, repo_root, subprocess_env):
    url = 'http://127.0.0.1:9/metrics/inception-2015-12-05.pkl'  # the discard port: nothing listens there
    subprocess_env['DNNLIB_CACHE_DIR'] = str(tmp_path / 'cache')
    with pytest.raises(calculate_metrics.DetectorUnavailable) as info:
        calculate_metrics.InceptionDetector(url, verbose=False)
    assert url in str(info.value) and '--detector=fid=' in str(info.value)

    images = write_pngs(tmp_path / 'images', 3, seed=4)
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(2), sigma=np.eye(2))
    proc = run_cli(['calc', f'--images={images}', f'--ref={tmp_path / "ref.npz"}', '--metrics=fid', '--num=3', '--workers=0',
                    f'--detector=fid={url}'], subprocess_env, repo_root, check=False)
    assert proc.returncode != 0 and url in proc.stderr and '--detector=fid=' in proc.stderr and 'Traceback' not in proc.stderr


def test_bad_metric_and_detector_options(tmp_path):
    result = CliRunner().invoke(calculate_metrics.cli, ['ref', f'--data={tmp_path}', f'--dest={tmp_path}/x.pkl', '--metrics=fid,kid'])
    assert result.exit_code != 0 and 'kid' in result.output
    result = CliRunner().invoke(calculate_metrics.cli, ['ref', f'--data={tmp_path}', f'--dest={tmp_path}/x.pkl', '--detector=inception.pkl'])
    assert result.exit_code != 0 and 'METRIC=' in result.output


@pytest.mark.slow
def test_gen_with_student_pickle(tmp_path, detectors, repo_root, subprocess_env):
    import dnnlib
    import generate_images
    from training.encoders import StandardRGBEncoder
    from training.networks_edm2 import Precond
    models, paths = detectors
    torch.manual_seed(0)
    net = Precond(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                  attn_resolutions=[4], logvar_channels=8).eval().requires_grad_(False)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith('_gain'):
                param.fill_(1)  # fresh gains are 0, which would hide the U-Net
    student = dnnlib.EasyDict(encoder=StandardRGBEncoder(), dataset_kwargs=dnnlib.EasyDict(path='none'), ema=net,
                              cd=dict(S=2, sigma_min=0.002, sigma_max=80.0, rho=7.0))
    net_path = str(tmp_path / 'student.pkl')
    with open(net_path, 'wb') as f:
        pickle.dump(student, f)
    ref_dir = write_pngs(tmp_path / 'ref_images', 10, seed=5)
    ref_path = str(tmp_path / 'ref.pkl')
    run_cli(['ref', f'--data={ref_dir}', f'--dest={ref_path}', '--metrics=fid', '--workers=0', f'--detector=fid={paths["fid"]}'],
            subprocess_env, repo_root)
    proc = run_cli(['gen', f'--net={net_path}', f'--ref={ref_path}', '--metrics=fid', '--num=9', '--seed=3', '--batch=4',
                    f'--detector=fid={paths["fid"]}'], subprocess_env, repo_root)

    rnd = generate_images.StackedRandomGenerator('cpu', range(3, 12))
    with torch.no_grad():
        images = StandardRGBEncoder().decode(generate_images.consistency_sampler(net, rnd.randn([9, 3, 8, 8]), num_steps=2))
        features = models['fid'](images, return_features=True).double().numpy()
    expected = fd_by_eigenvalues(features, features_of_folder(ref_dir, models)['fid'])
    assert printed_metric(proc.stdout, 'fid') == pytest.approx(expected, rel=1e-3)
