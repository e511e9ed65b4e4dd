import io
import json
import math
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from training import training_loop
from training.training_loop import EDM2Loss, learning_rate_schedule, sanitize_gradients


def write_image_zip(path, num_images, resolution, labels=None, seed=0):
    """A dataset ZIP as dataset_tool.py writes it: blocky RGB PNGs plus dataset.json."""
    rng = np.random.default_rng(seed)
    names = [f'{i // 1000:05d}/img{i:08d}.png' for i in range(num_images)]
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as zf:
        for name in names:
            blocks = rng.integers(0, 256, size=[4, 4, 3], dtype=np.uint8)
            pixels = blocks.repeat(resolution // 4, axis=0).repeat(resolution // 4, axis=1)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format='png', compress_level=0)
            zf.writestr(name, buf.getvalue())
        label_list = None if labels is None else [[name, int(label)] for name, label in zip(names, labels)]
        zf.writestr('dataset.json', json.dumps({'labels': label_list}))
    return str(path)


class RecordingDenoiser(torch.nn.Module):
    """Deterministic stand-in network that remembers what the loss fed it."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.7))
        self.logvar_slope = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x, sigma, class_labels=None, return_logvar=False):
        self.seen = (x.detach().clone(), sigma.detach().clone(), class_labels)
        denoised = x * self.scale
        logvar = self.logvar_slope * sigma.log()
        return (denoised, logvar) if return_logvar else denoised


def test_edm2_loss_matches_formula_per_element():
    torch.manual_seed(1)
    images = torch.randn([5, 3, 4, 4])
    labels = torch.eye(5)
    net = RecordingDenoiser()
    loss_fn = EDM2Loss(P_mean=-0.4, P_std=1.0, sigma_data=0.5)
    loss = loss_fn(net=net, images=images, labels=labels)

    noisy, sigma, seen_labels = net.seen
    assert seen_labels is labels
    assert sigma.shape == (5, 1, 1, 1)
    with torch.no_grad():
        denoised = noisy * net.scale
        u = net.logvar_slope * sigma.log()
        lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
        expected = lam / u.exp() * (denoised - images) ** 2 + u
    assert loss.shape == images.shape
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-6)
    loss.sum().backward()
    assert net.scale.grad is not None and net.logvar_slope.grad is not None


def test_edm2_loss_noise_distribution():
    torch.manual_seed(2)
    images = torch.zeros([4000, 1, 2, 2])
    net = RecordingDenoiser()
    EDM2Loss(P_mean=-1.2, P_std=0.6)(net=net, images=images)
    noisy, sigma, _ = net.seen
    ln_sigma = sigma.log().flatten()
    assert abs(ln_sigma.mean().item() + 1.2) < 0.05
    assert abs(ln_sigma.std().item() - 0.6) < 0.05
    unit_noise = noisy / sigma
    assert abs(unit_noise.mean().item()) < 0.03
    assert abs(unit_noise.std().item() - 1) < 0.03


def test_edm2_loss_with_real_network(single_thread):
    from training.networks_edm2 import Precond
    torch.manual_seed(0)
    net = Precond(img_resolution=8, img_channels=3, label_dim=2, use_fp16=False, model_channels=16,
        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    images = torch.randn([2, 3, 8, 8])
    loss = EDM2Loss()(net=net, images=images, labels=torch.eye(2))
    assert loss.shape == images.shape and torch.isfinite(loss).all()
    loss.sum().backward()
    assert net.logvar_linear.weight.grad is not None


@pytest.mark.parametrize('cur_nimg, kwargs, expected', [
    (0,      dict(), 0.0),
    (5e6,    dict(), 100e-4 * 0.5),
    (10e6,   dict(), 100e-4),
    (4 * 70e3 * 2048, dict(), 100e-4 / 2),
    (250,    dict(ref_lr=0.02, ref_batches=100, rampup_Mimg=0.001), 0.02 * 0.25),
    (1000,   dict(ref_lr=0.02, ref_batches=100, rampup_Mimg=0.001), 0.02),
    (9000,   dict(ref_lr=0.02, ref_batches=100, rampup_Mimg=0.001), 0.02 / 3),
    (9000,   dict(ref_lr=0.02, ref_batches=0, rampup_Mimg=0.001), 0.02),
    (0,      dict(ref_lr=0.02, ref_batches=100, rampup_Mimg=0), 0.02),
    (4000,   dict(ref_lr=0.02, ref_batches=100, rampup_Mimg=0), 0.01),
])
def test_learning_rate_schedule(cur_nimg, kwargs, expected):
    batch_size = kwargs.pop('batch_size', 10 if kwargs else 2048)
    assert math.isclose(learning_rate_schedule(cur_nimg, batch_size, **kwargs), expected, rel_tol=1e-12, abs_tol=1e-15)


def test_sanitize_gradients_reports_then_zeroes():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2))
    c = torch.nn.Parameter(torch.zeros(1))  # no gradient at all
    a.grad = torch.tensor([3.0, float('nan'), 4.0])
    b.grad = torch.tensor([float('inf'), -float('inf')])
    norm, num_bad = sanitize_gradients([a, b, c], force_finite=False)
    assert num_bad == 3 and not math.isfinite(norm)
    assert torch.isnan(a.grad[1])

    norm, num_bad = sanitize_gradients([a, b, c], force_finite=True)
    assert num_bad == 3
    assert torch.equal(a.grad, torch.tensor([3.0, 0.0, 4.0])) and torch.equal(b.grad, torch.zeros(2))
    norm, num_bad = sanitize_gradients([a, b, c])
    assert num_bad == 0 and math.isclose(norm, 5.0, rel_tol=1e-6)


def test_split_batch_and_interval_checks():
    assert training_loop.split_batch(64, None, 2) == (32, 1)
    assert training_loop.split_batch(64, 8, 2) == (8, 4)
    assert training_loop.split_batch(64, 1000, 1) == (64, 1)
    with pytest.raises(ValueError, match='batch_gpu=12'):
        training_loop.split_batch(64, 12, 1)
    with pytest.raises(ValueError, match='batch_size=30'):
        training_loop.split_batch(30, None, 4)
    training_loop.check_intervals(32, 4096, None, 64, 1024, 0)
    with pytest.raises(ValueError, match='status_nimg=48'):
        training_loop.check_intervals(32, 4096, None, 48, 1024, 0)
    with pytest.raises(ValueError, match='snapshot_nimg=1000'):
        training_loop.check_intervals(8, 4096, None, 64, 1000, 0)
    with pytest.raises(ValueError, match='checkpoint_nimg=2048'):
        training_loop.check_intervals(3072, 3072, None, 0, 0, 2048)


def test_freeze_parameters():
    net = torch.nn.Sequential()
    net.add_module('trunk', torch.nn.Linear(2, 2))
    net.add_module('logvar_linear', torch.nn.Linear(2, 1))
    training_loop.freeze_parameters(net, ['logvar_linear'])
    assert [name for name, p in net.named_parameters() if not p.requires_grad] == ['logvar_linear.weight', 'logvar_linear.bias']
    with pytest.raises(ValueError, match="'head'"):
        training_loop.freeze_parameters(net, ['head'])


def test_default_data_loader_kwargs():
    cpu = training_loop.default_data_loader_kwargs(torch.device('cpu'))
    assert cpu['pin_memory'] is False and cpu['num_workers'] == 0
    cuda = training_loop.default_data_loader_kwargs(torch.device('cuda'))
    assert cuda['pin_memory'] is True and cuda['num_workers'] == 2


TINY_NET = dict(class_name='training.networks_edm2.Precond', model_channels=16, channel_mult=[1, 2], num_blocks=1,
    attn_resolutions=[], use_fp16=False)


def _tiny_loop_kwargs(tmp_path, data_path, **overrides):
    kwargs = dict(
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data_path, use_labels=True),
        encoder_kwargs=dict(class_name='training.encoders.StandardRGBEncoder'),
        network_kwargs=TINY_NET,
        lr_kwargs=dict(func_name='training.training_loop.learning_rate_schedule', ref_lr=0.01, ref_batches=0, rampup_Mimg=0),
        run_dir=str(tmp_path), batch_size=8, batch_gpu=4, total_nimg=32,
        status_nimg=16, snapshot_nimg=1024, checkpoint_nimg=1024, device='cpu')
    kwargs.update(overrides)
    return kwargs


def test_training_loop_hooks(tmp_path, single_thread):
    data_path = write_image_zip(tmp_path / 'data.zip', 16, 8, labels=[i % 3 for i in range(16)])
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    nets, initial = [], {}

    def seed_from_teacher(net):
        nets.append(net)
        with torch.no_grad():
            net.logvar_linear.weight.fill_(0.25)
        initial.update({name: value.clone() for name, value in net.state_dict().items()})

    training_loop.training_loop(**_tiny_loop_kwargs(run_dir, data_path, init_net_fn=seed_from_teacher,
        frozen_params=['logvar_linear'], cd_metadata=dict(S=4)))
    net = nets[0]
    assert net.label_dim == 3 and net.img_resolution == 8
    assert not net.logvar_linear.weight.requires_grad and net.logvar_linear.weight.grad is None
    assert not torch.equal(net.unet.out_gain, initial['unet.out_gain'])

    with open(run_dir / 'network-snapshot-0000000-0.050.pkl', 'rb') as f:
        snapshot = pickle.load(f)
    assert list(snapshot.keys()) == ['encoder', 'dataset_kwargs', 'cd', 'ema']
    assert snapshot['cd'] == dict(S=4)
    assert torch.all(snapshot['ema'].logvar_linear.weight == 0.25)

    state = torch.load(run_dir / 'training-state-0000000.pt', weights_only=False)
    assert state['state']['cur_nimg'] == 32
    for name, value in net.state_dict().items():
        assert torch.equal(state['net'][name], value), name
    param_names = [name for name, _ in net.named_parameters()]
    assert param_names.index('logvar_linear.weight') not in state['optimizer']['state']  # Adam never saw a gradient
    assert param_names.index('unet.out_gain') in state['optimizer']['state']
    lines = [json.loads(line) for line in open(run_dir / 'stats.jsonl')]
    assert [line['Progress/kimg'] for line in lines] == [0.0, 0.016, 0.032]
    assert lines[-1]['Loss/nan_inf_grad_count'] == 0 and lines[-1]['Loss/grad_norm'] > 0


def test_training_loop_refuses_finished_run(tmp_path, single_thread):
    data_path = write_image_zip(tmp_path / 'data.zip', 8, 8)
    kwargs = _tiny_loop_kwargs(tmp_path, data_path, total_nimg=8, status_nimg=0, snapshot_nimg=0)
    kwargs['dataset_kwargs']['use_labels'] = False
    training_loop.training_loop(**kwargs)
    assert os.path.isfile(tmp_path / 'training-state-0000000.pt')
    with pytest.raises(RuntimeError, match='already at 8 images'):
        training_loop.training_loop(**kwargs)


DDP_SCRIPT = r'''
import sys, torch
from torch_utils import distributed as dist
from training import training_loop
kwargs = eval(sys.argv[1])
dist.init()
nets = []
def flat_params(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()]).clone()
def gather(tensor):
    out = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    torch.distributed.all_gather(out, tensor)
    return out
def capture(net):
    nets.append(net)
    nets.append(flat_params(net))
training_loop.training_loop(init_net_fn=capture, **kwargs)
result = dict(initial=gather(nets[1]), final=gather(flat_params(nets[0])))
if dist.get_rank() == 0:
    torch.save(result, kwargs['run_dir'] + '/ranks.pt')
'''


@pytest.mark.slow
def test_ddp_ranks_stay_identical(tmp_path, repo_root, subprocess_env):
    data_path = write_image_zip(tmp_path / 'data.zip', 16, 8, labels=[i % 2 for i in range(16)])
    script = tmp_path / 'ddp_train.py'
    script.write_text(DDP_SCRIPT)
    kwargs = _tiny_loop_kwargs(tmp_path, data_path, status_nimg=0, snapshot_nimg=0, checkpoint_nimg=0)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script), repr(kwargs)]
    result = subprocess.run(cmd, cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = torch.load(tmp_path / 'ranks.pt')
    assert len(ranks['final']) == 2
    assert not torch.equal(ranks['initial'][0], ranks['initial'][1])  # each rank draws its own initialisation
    assert torch.equal(ranks['final'][0], ranks['final'][1])
    assert not torch.equal(ranks['final'][0], ranks['initial'][0])
