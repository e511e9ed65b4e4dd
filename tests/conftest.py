"""Fixtures shared by the test files; the functions behind them are in helpers.py."""

import importlib
import os
import sys

import pytest
import torch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TESTS_DIR))  # the repository: dnnlib, torch_utils, training, the scripts
sys.path.insert(0, TESTS_DIR)                   # helpers.py, whatever import mode pytest uses

import helpers  # noqa: E402

if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)  # the test workers (pytest -n) share the machine's cores: one thread each


@pytest.fixture
def repo_root():
    return helpers.REPO_ROOT


@pytest.fixture
def subprocess_env():
    """Environment for running the repo's scripts as subprocesses on CPU (a fresh dict a test may change)."""
    return helpers.script_env()


@pytest.fixture(scope='module')
def single_thread():
    """One torch thread: the tests' tiny networks run several times slower with threads contending for shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def no_process_group(monkeypatch):
    """Run a command in this process (CliRunner) without joining a process group; single-rank code needs none."""
    from torch_utils import distributed as dist
    monkeypatch.setattr(dist, 'init', lambda: None)

#----------------------------------------------------------------------------
# Data and networks for the command-line runs. Read-only: a test that damages one works on a copy.

@pytest.fixture(scope='session')
def data16(tmp_path_factory):
    """64 unlabelled 16x16 RGB images of random 4x4 blocks, as a dataset ZIP."""
    return helpers.write_image_zip(tmp_path_factory.mktemp('data') / 'blocks16.zip', 64, 16)


@pytest.fixture(scope='session')
def teacher16(tmp_path_factory):
    """A fresh unconditional 16x16 teacher pickle (helpers.make_teacher), also used as an --init network."""
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pkl'
    helpers.make_teacher(path, label_dim=0)
    return str(path)


@pytest.fixture(scope='session')
def tiny_vae_dir(tmp_path_factory):
    """A tiny randomly initialised AutoencoderKL (downsampling by 8, 4 latent channels), saved
    like a Hugging Face model so that StabilityVAEEncoder loads it from a local directory."""
    diffusers = pytest.importorskip('diffusers')
    with torch.random.fork_rng(devices=[]): # seeds only this VAE, not the tests that follow
        torch.manual_seed(0)
        vae = diffusers.models.AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4,
            norm_num_groups=4, sample_size=16, down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4)
    path = tmp_path_factory.mktemp('tiny_vae')
    vae.save_pretrained(path)
    return str(path)

#----------------------------------------------------------------------------
# Stand-ins for the Inception and DINOv2 detectors of calculate_metrics.py: persistent modules, so
# their pickles carry their own source and load anywhere, like the official Inception pickle.

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


@pytest.fixture(scope='session')
def detectors(tmp_path_factory):
    """({metric: detector module}, {metric: path of its pickle}) for 'fid' and 'fd_dinov2'."""
    root = tmp_path_factory.mktemp('detectors')
    (root / 'tiny_metric_detectors.py').write_text(DETECTOR_SOURCE)
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module('tiny_metric_detectors')
    finally:
        sys.path.remove(str(root))
    models = {'fid': module.PooledProjection(5, seed=0, takes_uint8=True),
              'fd_dinov2': module.PooledProjection(4, seed=1, takes_uint8=False)}
    paths = {metric: helpers.save_pickle(model, root / f'{metric}.pkl') for metric, model in models.items()}
    return models, paths
