import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO_ROOT, 'tests', 'fixtures')
sys.path.insert(0, REPO_ROOT)


@pytest.fixture
def repo_root():
    return REPO_ROOT


@pytest.fixture
def subprocess_env():
    """Environment for running the repo's scripts as subprocesses on CPU."""
    env = dict(os.environ)
    env['PYTHONPATH'] = REPO_ROOT + os.pathsep + env.get('PYTHONPATH', '')
    env['CUDA_VISIBLE_DEVICES'] = ''
    env['OMP_NUM_THREADS'] = '1'
    return env


@pytest.fixture(scope='module')
def single_thread():
    """One torch thread: the tests' tiny networks run several times slower with threads contending for shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
