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
