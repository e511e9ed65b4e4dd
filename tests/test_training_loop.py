import ast
import json
import math
import os

import pytest
import torch

import dnnlib
from helpers import (REPO_ROOT, TINY_ARCH, assert_same_state, load_pickle, load_state, read_stats, read_zip, run_script,
    torchrun, write_image_zip, write_zip)
from training import training_loop
from training.training_loop import EDM2Loss, learning_rate_schedule, sanitize_gradients


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
    torch.manual_seed(0)
    net = dnnlib.util.construct_class_by_name(**TINY_NET, img_resolution=8, img_channels=3, label_dim=2)
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
    for args, option, message in [((64, 12, 1), 'batch_gpu', 'not a multiple of 12 images per forward pass'),
            ((30, None, 4), 'batch_size', '30 images per step do not split evenly over 4')]:
        with pytest.raises(dnnlib.UserError, match=message) as info:
            training_loop.split_batch(*args)
        assert info.value.option == option
    training_loop.check_intervals(32, 4096, None, 64, 1024, 0)
    for args, option in [((32, 4096, None, 48, 1024, 0), 'status_nimg'), ((8, 4096, None, 64, 1000, 0), 'snapshot_nimg'),
            ((3072, 3072, None, 0, 0, 2048), 'checkpoint_nimg'), ((32, 0, None, 0, 0, 0), 'total_nimg')]:
        with pytest.raises(dnnlib.UserError) as info:
            training_loop.check_intervals(*args)
        assert info.value.option == option


def test_edm2_loss_state_keeps_the_constructed_settings():
    state = EDM2Loss(P_mean=-0.8, P_std=1.6).state_dict()
    assert (state['P_mean'], state['P_std'], state['sigma_data']) == (-0.8, 1.6, 0.5)  # EDM2's attributes
    EDM2Loss(P_mean=-0.8, P_std=1.6).load_state_dict(state)
    with pytest.raises(dnnlib.UserError, match='P_mean: training state -0.8, now 2.5'):
        EDM2Loss(P_mean=2.5, P_std=1.6).load_state_dict(state)


def test_default_data_loader_kwargs():
    cpu = training_loop.default_data_loader_kwargs(torch.device('cpu'))
    assert cpu['pin_memory'] is False and cpu['num_workers'] == 0
    cuda = training_loop.default_data_loader_kwargs(torch.device('cuda'))
    assert cuda['pin_memory'] is True and cuda['num_workers'] == 2


TINY_NET = dict(class_name='training.networks_edm2.Precond', **TINY_ARCH, attn_resolutions=[], use_fp16=False)


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


class RecordingMethod:
    """A training method with every optional hook: EDM2's loss, plus a record of what the loop calls."""
    calls = []

    def __init__(self, nan_from_nimg=None):
        self.loss = EDM2Loss(P_mean=-0.8, P_std=1.6)
        self.nan_from_nimg, self.cur_nimg = nan_from_nimg, None

    def prepare(self, encoder, latent_shape, label_dim, device):
        self.calls.append(('prepare', tuple(latent_shape), label_dim, device.type))

    def init_network(self, net):
        self.calls.append(('init_network', net.img_resolution))
        with torch.no_grad():
            net.logvar_linear.weight.fill_(0.25)
        net.logvar_linear.weight.requires_grad_(False)

    def set_progress(self, cur_nimg):
        self.calls.append(('set_progress', cur_nimg))
        self.cur_nimg = cur_nimg

    def snapshot_entries(self):
        return dict(method=dict(cur_nimg=self.cur_nimg))

    def state_dict(self):
        return dict(cur_nimg=self.cur_nimg)

    def load_state_dict(self, state):
        self.calls.append(('load_state_dict', state['cur_nimg']))

    def __call__(self, net, images, labels=None):
        loss = self.loss(net, images, labels)
        if self.nan_from_nimg is not None and self.cur_nimg >= self.nan_from_nimg:
            loss = loss * float('nan')
        return loss


def test_training_loop_calls_the_method_hooks(tmp_path, single_thread):
    data_path = write_image_zip(tmp_path / 'data.zip', 16, 8, labels=[i % 3 for i in range(16)])
    run_dir = tmp_path / 'run'
    RecordingMethod.calls.clear()
    training_loop.training_loop(**_tiny_loop_kwargs(run_dir, data_path, loss_kwargs=dict(class_name=RecordingMethod)))
    calls = RecordingMethod.calls
    assert calls[:2] == [('prepare', (1, 3, 8, 8), 3, 'cpu'), ('init_network', 8)]
    assert calls[2:] == [('set_progress', nimg) for nimg in (0, 8, 16, 24)]

    snapshot = load_pickle(run_dir / 'network-snapshot-0000000-0.050.pkl')
    assert list(snapshot.keys()) == ['encoder', 'dataset_kwargs', 'method', 'ema']  # no loss object
    assert snapshot['method'] == dict(cur_nimg=None)
    state = load_state(run_dir / 'training-state-0000000.pt')
    assert state['state']['cur_nimg'] == 32 and state['loss_fn'] == dict(cur_nimg=24)
    assert not torch.equal(state['net']['unet.out_gain'], torch.zeros([]))
    weight = state['net']['logvar_linear.weight']
    assert torch.all(weight == weight.flatten()[0])  # the method's init, frozen (only weight-normalised)
    names = list(dict(snapshot['ema'].named_parameters()))
    assert names.index('logvar_linear.weight') not in state['optimizer']['state']
    assert names.index('unet.out_gain') in state['optimizer']['state']
    lines = read_stats(run_dir)
    assert [line['Progress/kimg'] for line in lines] == [0.0, 0.016, 0.032]
    assert lines[-1]['Loss/nan_inf_grad_count'] == 0 and lines[-1]['Loss/grad_norm'] > 0

    RecordingMethod.calls.clear()
    training_loop.training_loop(**_tiny_loop_kwargs(run_dir, data_path, loss_kwargs=dict(class_name=RecordingMethod),
        total_nimg=40))
    assert ('load_state_dict', 24) in RecordingMethod.calls and RecordingMethod.calls[-1] == ('set_progress', 32)


def test_training_loop_knows_no_method():
    """The loop reaches methods only through the hooks; its source travels in pickles that EDM2 must read."""
    path = os.path.join(REPO_ROOT, 'training', 'training_loop.py')
    source = open(path).read()
    assert 'teacher' not in source.lower() and 'loss_cd' not in source and 'pretrained' not in source
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.update(f'{node.module}.{alias.name}' for alias in node.names)
    edm2_provides = {'copy', 'json', 'os', 'pickle', 'time', 'numpy', 'psutil', 'torch', 'dnnlib',
        'torch_utils.distributed', 'torch_utils.misc', 'torch_utils.persistence', 'torch_utils.training_stats'}
    assert imported <= edm2_provides, imported - edm2_provides


def test_training_loop_refuses_finished_run(tmp_path, single_thread):
    data_path = write_image_zip(tmp_path / 'data.zip', 8, 8)
    kwargs = _tiny_loop_kwargs(tmp_path, data_path, total_nimg=8, status_nimg=0, snapshot_nimg=0)
    kwargs['dataset_kwargs']['use_labels'] = False
    training_loop.training_loop(**kwargs)
    assert os.path.isfile(tmp_path / 'training-state-0000000.pt')
    with pytest.raises(dnnlib.UserError, match='already at 8 images'):
        training_loop.training_loop(**kwargs)


def test_persistent_nonfinite_steps_stop_the_run(tmp_path, single_thread, capsys):
    data_path = write_image_zip(tmp_path / 'data.zip', 16, 8, labels=[i % 3 for i in range(16)])
    kwargs = _tiny_loop_kwargs(tmp_path / 'run', data_path, total_nimg=64, status_nimg=16, snapshot_nimg=0,
        loss_kwargs=dict(class_name=RecordingMethod, nan_from_nimg=24), max_nonfinite_steps=3)
    with pytest.raises(training_loop.TrainingDiverged, match='at 0 kimg: 3 optimizer steps in a row'):
        training_loop.training_loop(**kwargs)
    assert 'Warning: 1 of the last 2 steps had NaN/Inf' in capsys.readouterr().out
    assert not any(name.endswith(('.pt', '.pkl')) for name in os.listdir(tmp_path / 'run'))  # nothing NaN saved
    rows = read_stats(tmp_path / 'run')
    assert [row['Loss/nonfinite_step'] for row in rows[1:]] == [0, 0.5, 1]

    # EDM2's behaviour, zeroing the gradients and going on, is still there with max_nonfinite_steps=0.
    training_loop.training_loop(**dict(kwargs, run_dir=str(tmp_path / 'edm2'), max_nonfinite_steps=0))
    assert os.path.isfile(tmp_path / 'edm2' / 'training-state-0000000.pt')


def test_resume_refuses_other_settings_and_records_schedule_changes(tmp_path, single_thread):
    data_path = write_image_zip(tmp_path / 'data.zip', 16, 8, labels=[i % 3 for i in range(16)])
    kwargs = _tiny_loop_kwargs(tmp_path / 'run', data_path, total_nimg=16, snapshot_nimg=0)
    training_loop.training_loop(**kwargs)
    changed = dict(kwargs, total_nimg=32, loss_kwargs=dict(class_name='training.training_loop.EDM2Loss', P_mean=2.5),
        seed=7, network_kwargs=dict(TINY_NET, dropout=0.1))
    with pytest.raises(dnnlib.UserError) as info:
        training_loop.training_loop(**changed)
    for fragment in ['loss_kwargs.P_mean: run <unset>, now 2.5', 'seed: run 0, now 7', 'network_kwargs.dropout: run <unset>, now 0.1']:
        assert fragment in str(info.value)
    assert 'total_nimg' not in str(info.value)
    training_loop.training_loop(**dict(kwargs, total_nimg=32, lr_kwargs=dict(kwargs['lr_kwargs'], ref_lr=0.02)))
    recorded = json.load(open(tmp_path / 'run' / 'training_options.json'))
    assert recorded['total_nimg'] == 32 and recorded['lr_kwargs']['ref_lr'] == 0.02


def _replace_member(zip_path, name, data):
    write_zip(zip_path, {**read_zip(zip_path), name: data})


def test_unreadable_sample_stops_after_saving_the_state(tmp_path, single_thread):
    labels = [i % 3 for i in range(16)]
    kwargs = dict(total_nimg=64, status_nimg=0, snapshot_nimg=0)
    straight = write_image_zip(tmp_path / 'straight.zip', 16, 8, labels=labels)
    training_loop.training_loop(**_tiny_loop_kwargs(tmp_path / 'straight', straight, **kwargs))

    data_path = write_image_zip(tmp_path / 'data.zip', 16, 8, labels=labels)
    good = read_zip(data_path)['00000/img00000005.png']
    _replace_member(data_path, '00000/img00000005.png', b'not a png at all')
    with pytest.raises(dnnlib.UserError, match=r'img00000005\.png.*Training stopped at 0 kimg after saving its state'):
        training_loop.training_loop(**_tiny_loop_kwargs(tmp_path / 'run', data_path, **kwargs))
    states = sorted(name for name in os.listdir(tmp_path / 'run') if name.endswith('.pt'))
    assert states == ['training-state-0000000.pt']
    assert 0 < load_state(tmp_path / 'run' / states[0])['state']['cur_nimg'] < 64

    _replace_member(data_path, '00000/img00000005.png', good)  # the user repairs the file and reruns
    training_loop.training_loop(**_tiny_loop_kwargs(tmp_path / 'run', data_path, **kwargs))
    resumed = load_state(tmp_path / 'run' / 'training-state-0000000.pt')
    expected = load_state(tmp_path / 'straight' / 'training-state-0000000.pt')
    assert resumed['state']['cur_nimg'] == 64
    assert_same_state(expected, resumed, parts=('net',))


def test_unreadable_newest_state_falls_back_to_the_previous(tmp_path, single_thread, capsys):
    data_path = write_image_zip(tmp_path / 'data.zip', 16, 8, labels=[i % 3 for i in range(16)])
    kwargs = dict(status_nimg=0, snapshot_nimg=0, checkpoint_nimg=1024, batch_size=256, batch_gpu=None)
    training_loop.training_loop(**_tiny_loop_kwargs(tmp_path / 'straight', data_path, total_nimg=3072, **kwargs))
    run = tmp_path / 'run'
    training_loop.training_loop(**_tiny_loop_kwargs(run, data_path, total_nimg=2048, **kwargs))
    newest = run / 'training-state-0000002.pt'
    newest.write_bytes(newest.read_bytes()[:1000])  # a save cut short by a crash outside our control
    (run / '.training-state-0000003.pt.0123456789abcdef0123456789abcdef.tmp').write_bytes(b'partial')
    training_loop.training_loop(**_tiny_loop_kwargs(run, data_path, total_nimg=3072, **kwargs))
    out = capsys.readouterr().out
    assert 'Warning: cannot read' in out and 'training-state-0000002.pt.corrupt' in out
    assert 'Loading ' + str(run / 'training-state-0000001.pt') in out
    assert sorted(os.listdir(run)) == ['training-state-0000001.pt', 'training-state-0000002.pt',
        'training-state-0000002.pt.corrupt', 'training-state-0000003.pt', 'training_options.json']
    resumed = load_state(run / 'training-state-0000003.pt')
    straight = load_state(tmp_path / 'straight' / 'training-state-0000003.pt')
    assert_same_state(straight, resumed, parts=('net',))

    for path in run.glob('training-state-*.pt'):
        path.write_bytes(b'')
    with pytest.raises(dnnlib.UserError, match='None of the 3 training states'):
        training_loop.training_loop(**_tiny_loop_kwargs(run, data_path, total_nimg=4096, **kwargs))


DDP_SCRIPT = r'''
import sys, torch
from torch_utils import distributed as dist
from training import training_loop
from training.training_loop import EDM2Loss
kwargs = eval(sys.argv[1])
dist.init()
nets = []
def flat_params(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()]).clone()
def gather(tensor):
    out = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    torch.distributed.all_gather(out, tensor)
    return out
class CapturingLoss(EDM2Loss):
    def init_network(self, net):
        nets.append(net)
        nets.append(flat_params(net))
training_loop.training_loop(loss_kwargs=dict(class_name=CapturingLoss), **kwargs)
result = dict(initial=gather(nets[1]), final=gather(flat_params(nets[0])))
if dist.get_rank() == 0:
    torch.save(result, kwargs['run_dir'] + '/ranks.pt')
'''


@pytest.mark.slow
def test_ddp_ranks_stay_identical(tmp_path):
    data_path = write_image_zip(tmp_path / 'data.zip', 16, 8, labels=[i % 2 for i in range(16)])
    script = tmp_path / 'ddp_train.py'
    script.write_text(DDP_SCRIPT)
    kwargs = _tiny_loop_kwargs(tmp_path, data_path, status_nimg=0, snapshot_nimg=0, checkpoint_nimg=0)
    run_script(script, repr(kwargs), launcher=torchrun())
    ranks = torch.load(tmp_path / 'ranks.pt')
    assert len(ranks['final']) == 2
    assert not torch.equal(ranks['initial'][0], ranks['initial'][1])  # each rank draws its own initialisation
    assert torch.equal(ranks['final'][0], ranks['final'][1])
    assert not torch.equal(ranks['final'][0], ranks['initial'][0])
