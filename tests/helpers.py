"""What several test files share: paths, running the scripts, datasets, tiny EDM2 networks, stand-in
denoisers, the Gaussian-mixture problem, and checks of command output and training states.

A plain module (`import helpers`); conftest.py puts this folder on sys.path and builds the shared
fixtures from these functions.
"""

import io
import json
import math
import os
import pickle
import re
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import torch
from click.testing import CliRunner

import dnnlib

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
FIXTURES = os.path.join(TESTS_DIR, 'fixtures')

#----------------------------------------------------------------------------
# Files.

def load_fixture(name):
    """The arrays of tests/fixtures/<name>.npz (the parity set), as a dict."""
    with np.load(os.path.join(FIXTURES, f'{name}.npz')) as data:
        return dict(data)


def save_pickle(obj, path):
    with open(path, 'wb') as f:
        pickle.dump(obj, f)
    return str(path)


def load_pickle(path):
    with open(path, 'rb') as f:
        return pickle.load(f)


def load_state(path):
    """A training-state-*.pt file (it holds plain Python objects besides tensors)."""
    return torch.load(path, weights_only=False)


def read_stats(run_dir):
    """The rows of a run's stats.jsonl."""
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        return [json.loads(line) for line in f]

#----------------------------------------------------------------------------
# Running the repository's scripts.

def script_env(**overrides):
    """Environment for the repo's scripts as subprocesses: CPU only, one thread, the repo importable and, after
    it, this folder (worker scripts import helpers, and so does the source that pickles of persistent classes
    defined in test files carry)."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([REPO_ROOT, TESTS_DIR, env.get('PYTHONPATH', '')])
    env['CUDA_VISIBLE_DEVICES'] = ''
    env['OMP_NUM_THREADS'] = '1'
    env.update(overrides)
    return env


def torchrun(nproc_per_node=2, **rendezvous):
    """Launcher arguments for run_script: torchrun on this machine alone (--standalone), or with the
    given rendezvous options (nnodes=2, node_rank=0, master_port=..., ...)."""
    options = [f'--{name}={value}' for name, value in rendezvous.items()] or ['--standalone']
    return ['-m', 'torch.distributed.run', *options, f'--nproc_per_node={nproc_per_node}']


def script_command(script, *args, launcher=()):
    """[python, *launcher, script, *args]; script is relative to the repo root, a path, or '-c'."""
    return [sys.executable, *launcher, str(script), *map(str, args)]


def run_script(script, *args, env=None, cwd=REPO_ROOT, launcher=(), check=True, timeout=600):
    """Runs script_command(script, *args, launcher) in cwd with script_env() unless env is given, and
    returns the CompletedProcess (text output). check: the command must exit with status 0."""
    result = subprocess.run(script_command(script, *args, launcher=launcher), cwd=cwd,
        env=script_env() if env is None else env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, \
            f'{script} exited with {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    return result


def invoke(command, *args, **kwargs):
    """A click command run in this process (CliRunner); the arguments are turned into strings."""
    return CliRunner().invoke(command, [str(arg) for arg in args], **kwargs)

#----------------------------------------------------------------------------
# What commands print.

def error_line(stderr):
    """The one 'Error: ...' line a command printed for a user error, which must end its stderr."""
    assert 'Traceback' not in stderr and 'Aborted' not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('Error:')]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    return errors[0]


def assert_user_error(result, *fragments, exit_code=1):
    """A CliRunner result of a command that stopped with a one-line message holding every fragment;
    exit_code None accepts any failing status."""
    failed = result.exit_code != 0 if exit_code is None else result.exit_code == exit_code
    assert failed and isinstance(result.exception, SystemExit), (result.output, result.exception)
    line = error_line(result.stderr)
    assert all(fragment in line for fragment in fragments), (line, fragments)
    return line


def printed_value(output, label):
    """The number a command printed on a line '<label> = <number>'."""
    found = re.search(rf'^{re.escape(label)}\s*=\s*(\S+)', output, re.MULTILINE)
    assert found, f'no line "{label} = ..." in:\n{output}'
    return float(found.group(1))

#----------------------------------------------------------------------------
# Datasets, written directly with PIL/numpy (independent of dataset_tool.py), and through dataset_tool.py.

def random_images(count, size=8, channels=3, seed=0):
    """uint8 images [count, size, size, channels] ([count, size, size] for one channel)."""
    shape = [count, size, size, channels] if channels > 1 else [count, size, size]
    return np.random.RandomState(seed).randint(0, 256, size=shape, dtype=np.uint8)


def png_bytes(array, **save_kwargs):
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, format='png', **save_kwargs)
    return buf.getvalue()


def npy_bytes(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def read_zip(path):
    """{member name: bytes} of a ZIP archive."""
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def write_zip(path, members):
    """An uncompressed ZIP archive holding `members` ({name: bytes or str}) in their order."""
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return str(path)


def write_dataset(root, files, labels=None, as_zip=False):
    """files: {archive name: bytes}. labels: list of [name, label] or None (no dataset.json).
    Written as the folder `root`, or as the archive `root`.zip."""
    entries = dict(files)
    if labels is not None:
        entries['dataset.json'] = json.dumps({'labels': labels}).encode()
    if as_zip:
        return write_zip(str(root) + '.zip', entries)
    for name, data in entries.items():
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        with open(os.path.join(root, name), 'wb') as f:
            f.write(data)
    return str(root)


def image_set(images, classes=None):
    """PNG files for `images` in subfolders of three, and their [name, class] labels (None without classes)."""
    names = [f'{idx // 3:05d}/img{idx:08d}.png' for idx in range(len(images))]
    files = {name: png_bytes(image) for name, image in zip(names, images)}
    labels = None if classes is None else [[name, int(c)] for name, c in zip(names, classes)]
    return files, labels


def latent_files(arrays):
    """NPY files as dataset_tool.py encode names them, one per array."""
    return {f'00000/img-mean-std-{idx:08d}.npy': npy_bytes(array) for idx, array in enumerate(arrays)}


def image_name(index):
    """The archive name dataset_tool.py (and write_image_zip) gives image number `index`."""
    return f'{index // 1000:05d}/img{index:08d}.png'


def write_image_zip(path, num_images, resolution, labels=None, seed=0):
    """A dataset ZIP as dataset_tool.py writes it: blocky RGB PNGs plus dataset.json."""
    rng = np.random.default_rng(seed)
    names = [image_name(i) for i in range(num_images)]
    members = {}
    for name in names:
        blocks = rng.integers(0, 256, size=[4, 4, 3], dtype=np.uint8)
        pixels = blocks.repeat(resolution // 4, axis=0).repeat(resolution // 4, axis=1)
        members[name] = png_bytes(pixels, compress_level=0)
    label_list = None if labels is None else [[name, int(label)] for name, label in zip(names, labels)]
    members['dataset.json'] = json.dumps({'labels': label_list})
    return write_zip(path, members)


def make_digits_zip(dest, resolution=16, max_images=None):
    """scikit-learn's digits (class-labelled) as a dataset ZIP, made by dataset_tool.py's command line."""
    limit = [] if max_images is None else [f'--max-images={max_images}']
    run_script('dataset_tool.py', 'convert', '--source=sklearn-digits', f'--dest={dest}',
        f'--resolution={resolution}x{resolution}', *limit)
    return str(dest)

#----------------------------------------------------------------------------
# Tiny EDM2 networks. Each test file that builds a Precond takes one of these; two kinds stay apart
# on purpose: teachers are fresh networks (zero gains, as EDM2 initialises them) that the command
# line copies into students, while the in-process networks get unit gains so that every branch matters.

TINY_ARCH = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1)  # every tiny U-Net of the tests
TEACHER_ARCH = dict(TINY_ARCH, attn_resolutions=[8])


def tiny_precond(seed=0, label_dim=0, dropout=0.0, frozen=False):
    """A seeded 8x8 Precond with attention at 4x4, a small log-variance head and unit gains (fresh gains
    are 0, which would switch off the U-Net, its conditioning and its dropout). frozen: eval mode
    without gradients, as a loaded network pickle."""
    from training.networks_edm2 import Precond
    torch.manual_seed(seed)
    net = Precond(img_resolution=8, img_channels=3, label_dim=label_dim, use_fp16=False, **TINY_ARCH,
        attn_resolutions=[4], logvar_channels=8, dropout=dropout)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith('_gain'):
                param.fill_(1)
    return net.eval().requires_grad_(False) if frozen else net


def weight_versions(net):
    """The in-place write counters of the U-Net's weights (CD does not evaluate the logvar head)."""
    return {name: param._version for name, param in net.unet.named_parameters() if name.endswith('weight')}


def network_pickle(net, cd=None, dataset_path='none'):
    """The entries of a network pickle as training writes it, with consistency settings `cd` for a student."""
    from training.encoders import StandardRGBEncoder
    data = dnnlib.EasyDict(encoder=StandardRGBEncoder(),
        dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=dataset_path, use_labels=False),
        ema=net)
    if cd is not None:
        data.cd = cd
    return data


def make_teacher(path, resolution=16, label_dim=10, seed=0):
    """A freshly initialised teacher network pickle for `train_edm2.py --teacher`; returns the network."""
    from training.networks_edm2 import Precond
    torch.manual_seed(seed)
    net = Precond(resolution, 3, label_dim=label_dim, **TEACHER_ARCH).eval().requires_grad_(False)
    save_pickle(network_pickle(net, dataset_path='teacher-data'), path)
    return net

#----------------------------------------------------------------------------
# Training states.

def assert_same_state(expected, actual, parts=('net', 'ema')):
    """Two loaded training states agree exactly in `parts`: 'net' (weights), 'ema' (every EMA profile),
    'optimizer' (every slot of every parameter) and 'loss_fn' (the loss's state)."""
    if 'net' in parts:
        for name, value in expected['net'].items():
            assert torch.equal(actual['net'][name], value), name
    if 'ema' in parts:
        for ema_expected, ema_actual in zip(expected['ema']['emas'], actual['ema']['emas']):
            assert all(torch.equal(ema_actual[name], value) for name, value in ema_expected.items())
    if 'optimizer' in parts:
        for index, slots in expected['optimizer']['state'].items():
            assert all(torch.equal(actual['optimizer']['state'][index][key], value) for key, value in slots.items())
    if 'loss_fn' in parts:
        assert actual['loss_fn'] == expected['loss_fn']

#----------------------------------------------------------------------------
# Analytic stand-in networks.

class AnalyticTeacher(torch.nn.Module):
    """The parity set's analytic teacher, in float32 and evaluated left to right as specified."""

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    @staticmethod
    def _inputs(x, sigma):
        return x.to(torch.float32), torch.as_tensor(sigma).to(torch.float32).reshape(-1, 1, 1, 1)

    def forward(self, x, sigma, class_labels=None, **kwargs):
        x, s = self._inputs(x, sigma)
        return x * 0.25 / (s * s + 0.25) + 0.1 * torch.tanh(x) * s / (s + 1)


class AnalyticStudent(AnalyticTeacher):
    """The parity set's analytic student."""

    def forward(self, x, sigma, class_labels=None, **kwargs):
        x, s = self._inputs(x, sigma)
        return x * 0.25 / (s * s + 0.25) + 0.2 * torch.sin(1.5 * x) * s / (s * s + 1) - 0.03 * s / (s + 1)


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of data y ~ N(mu, s^2) per pixel: E[y | y + sigma n = x] = mu + s^2/(s^2+sigma^2) (x - mu),
    computed in the dtype of x; sigma is a scalar or one value per sample."""

    def __init__(self, mu=0.0, s=0.5):
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        sigma = sigma.reshape(-1, *[1] * (x.ndim - 1)) if sigma.ndim else sigma
        return self.mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x - self.mu)

#----------------------------------------------------------------------------
# The Gaussian-mixture problem of the learning tests (test_cd_learning.py, test_ct.py, test_cdm.py):
# a 2-D mixture stored as [N, 2, 1, 1] "images", its exact denoiser, a small MLP student, training
# loops and distances to the true distribution.

MODE_MEANS = [[0.7, 0.0], [0.0, 0.7], [-0.7, 0.0], [0.0, -0.7]]
MODE_WEIGHTS = [0.4, 0.3, 0.2, 0.1]
MODE_STD = 0.05
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def as_images(points):
    return points.reshape(-1, 2, 1, 1)


def sample_mixture(num, generator):
    means, weights = torch.tensor(MODE_MEANS), torch.tensor(MODE_WEIGHTS)
    modes = torch.multinomial(weights, num, replacement=True, generator=generator)
    return as_images(means[modes] + MODE_STD * torch.randn(num, 2, generator=generator))


def sigma_column(sigma, x):
    """sigma given as a scalar, [N] or [N,1,1,1], as a float64 [N or 1, 1] column."""
    return torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)


class RecordingDenoiser(torch.nn.Module):
    """A denoiser that keeps the (x, sigma) of every call in `calls` and is otherwise `net`."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, sigma, class_labels=None):
        self.calls.append((x.clone(), torch.as_tensor(sigma).clone()))
        return self.net(x, sigma, class_labels)


class MixtureDenoiser(torch.nn.Module):
    """E[y | y + sigma * eps = x] for the mixture, in closed form (computed in float64)."""

    def __init__(self):
        super().__init__()
        self.register_buffer('means', torch.tensor(MODE_MEANS, dtype=torch.float64))
        self.register_buffer('log_weights', torch.tensor(MODE_WEIGHTS, dtype=torch.float64).log())

    def forward(self, x, sigma, class_labels=None):
        points = x.to(torch.float64).flatten(1)                              # [N, 2]
        var_x = MODE_STD ** 2 + sigma_column(sigma, x) ** 2                  # Var of x within a mode
        sq_dist = (points[:, None, :] - self.means[None]).square().sum(-1)   # [N, K]
        # All modes share var_x, so the Gaussian normalisers cancel in the softmax.
        responsibility = (self.log_weights - 0.5 * sq_dist / var_x).softmax(dim=1)
        shrink = (MODE_STD ** 2 / var_x)[:, :, None]  # E[y | x, mode k] = mu_k + shrink * (x - mu_k)
        per_mode = self.means[None] + shrink * (points[:, None, :] - self.means[None])
        return (responsibility[:, :, None] * per_mode).sum(1).to(x.dtype).reshape(x.shape)


class MLPDenoiser(torch.nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) with EDM's coefficients and an MLP as F."""

    def __init__(self, hidden=128, num_freqs=8, sigma_data=0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.register_buffer('freqs', 2.0 ** torch.arange(num_freqs, dtype=torch.float32) / 4)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(2 + 2 * num_freqs, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, 2))

    def forward(self, x, sigma, class_labels=None):
        points = x.to(torch.float32).flatten(1)
        sigma = sigma_column(sigma, x).to(torch.float32).expand(points.shape[0], 1)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sigma ** 2 + sd ** 2).sqrt()
        c_noise = sigma.log() / 4
        phase = c_noise * self.freqs
        features = torch.cat([c_in * points, phase.sin(), phase.cos()], dim=1)
        return (c_skip * points + c_out * self.mlp(features)).reshape(x.shape)


def fit_to_teacher(student, teacher, steps, batch_size, lr, generator):
    """Plain denoising regression onto the exact denoiser, weighted by 1/c_out^2 as in EDM.

    ln(sigma) ~ N(-0.4, 1.6^2) covers the whole sampling range [sigma_min, sigma_max].
    """
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    for _ in range(steps):
        y = sample_mixture(batch_size, generator)
        sigma = (torch.randn(batch_size, generator=generator) * 1.6 - 0.4).exp()
        x = y + sigma.reshape(-1, 1, 1, 1) * torch.randn(y.shape, generator=generator)
        with torch.no_grad():
            target = teacher(x, sigma)
        weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
        loss = (weight.reshape(-1, 1, 1, 1) * (student(x, sigma) - target).square()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def distil(student, loss_fn, steps, batch_size, lr, generator):
    """Adam on a consistency loss (CD or CT); returns the mean loss of every step."""
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    history = []
    for step in range(steps):
        loss_fn.set_progress(step * batch_size)
        loss = loss_fn(student, sample_mixture(batch_size, generator)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    return history


def sliced_wasserstein(a, b, num_projections=256, seed=0):
    """Mean over random directions of the 1-D Wasserstein-1 distance between equal-size point clouds."""
    angles = torch.rand(num_projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * math.pi
    directions = torch.stack([angles.cos(), angles.sin()], dim=1)
    proj_a = (a.double() @ directions.T).sort(dim=0).values
    proj_b = (b.double() @ directions.T).sort(dim=0).values
    return (proj_a - proj_b).abs().mean().item()


def energy_distance(a, b):
    a, b = a.double(), b.double()
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


def mode_statistics(points):
    """Mean distance to the nearest mode mean, and the fraction of points within 3 mode stds of one."""
    nearest = torch.cdist(points.double(), torch.tensor(MODE_MEANS, dtype=torch.float64)).min(dim=1).values
    return nearest.mean().item(), (nearest < 3 * MODE_STD).double().mean().item()


def distribution_report(points, truth):
    """Distances of a point cloud [N, 2] to a true sample of the mixture."""
    sw = sliced_wasserstein(points, truth)
    nearest, on_mode = mode_statistics(points)
    return dict(sliced_w1=sw, energy=energy_distance(points, truth), nearest_mode=nearest, on_mode=on_mode)

#----------------------------------------------------------------------------
# The class-labelled mixture of the guidance tests (test_guidance.py): class 0 holds modes 0 and 1, class 1
# modes 2 and 3, so the mixture above is the class marginal, MixtureDenoiser its exact unconditional denoiser
# and ClassGated(ModeSubsetDenoiser) the exact class-conditional one.

CLASS_MODES = [[0, 1], [2, 3]]


class ModeSubsetDenoiser(MixtureDenoiser):
    """The exact denoiser of the mixture restricted to the modes `modes` (the softmax renormalises their weights)."""

    def __init__(self, modes):
        super().__init__()
        self.means, self.log_weights = self.means[modes], self.log_weights[modes]


class ClassGated(torch.nn.Module):
    """A class-conditional denoiser made of one denoiser per class: row i is nets[k](x_i; sigma_i) for its
    one-hot label k (the label times each class's output, summed, so one-hot labels select exactly)."""

    def __init__(self, nets):
        super().__init__()
        self.nets = torch.nn.ModuleList(nets)

    def forward(self, x, sigma, class_labels):
        gates = class_labels.to(x.dtype).T.reshape(len(self.nets), -1, *[1] * (x.ndim - 1))
        return sum(gate * net(x, sigma) for gate, net in zip(gates, self.nets))


def sample_labelled_mixture(num, generator):
    """(points as images, one-hot class labels [N, 2]) of the mixture; classes by CLASS_MODES."""
    means, weights = torch.tensor(MODE_MEANS), torch.tensor(MODE_WEIGHTS)
    modes = torch.multinomial(weights, num, replacement=True, generator=generator)
    class_of_mode = torch.tensor([k for k, members in enumerate(CLASS_MODES) for _ in members])
    labels = torch.nn.functional.one_hot(class_of_mode[modes], len(CLASS_MODES)).to(torch.float32)
    return as_images(means[modes] + MODE_STD * torch.randn(num, 2, generator=generator)), labels


def distil_labelled(student, loss_fn, steps, batch_size, lr, generator):
    """distil() on the labelled mixture: the loss (and through it teacher, guide and student) sees the labels."""
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    history = []
    for step in range(steps):
        loss_fn.set_progress(step * batch_size)
        images, labels = sample_labelled_mixture(batch_size, generator)
        loss = loss_fn(student, images, labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    return history

#----------------------------------------------------------------------------
