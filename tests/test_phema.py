import copy
import math
import os
import pickle

import numpy as np
import pytest
import torch

import reconstruct_phema
from helpers import assert_user_error, invoke, load_pickle, run_script, save_pickle
from torch_utils import persistence
from training import phema


# A persistent 19-parameter toy, not an EDM2 network: the EMA arithmetic is checked on its flat parameter
# vector. Its snapshots carry this file's source, which reconstruct_phema.py runs when it loads them (the
# `helpers` import resolves there through helpers.script_env()).
@persistence.persistent_class
class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(6, 3))
        self.gain = torch.nn.Parameter(torch.zeros([]))
        self.register_buffer('marker', torch.zeros([]))


def _flat(net):
    return torch.cat([p.detach().flatten().to(torch.float64) for p in net.parameters()])


def _set_flat(net, values):
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(values.to(net.gain.dtype), net.parameters())


def test_std_and_exponent_conversions():
    assert phema.std_to_exp(0.050) == pytest.approx(16.97220, abs=1e-5)
    assert phema.std_to_exp(0.100) == pytest.approx(6.93720, abs=1e-5)
    stds = np.array([0.01, 0.05, 0.1, 0.2, 0.28])
    assert np.allclose(phema.exp_to_std(phema.std_to_exp(stds)), stds, rtol=1e-12)
    assert phema.exp_to_std(0) == pytest.approx(1 / math.sqrt(12))
    for bad in [0, -0.1, 0.2887, 1.0]:
        with pytest.raises(ValueError, match='EMA std'):
            phema.std_to_exp(bad)


def test_power_function_ema_equals_closed_form_average():
    # After n steps at t_i = i * delta, the weight of the i-th parameter value telescopes to
    # (i^(g+1) - (i-1)^(g+1)) / n^(g+1).
    torch.manual_seed(0)
    net = TinyNet().double()
    ema = phema.PowerFunctionEMA(net, stds=[0.05, 0.2])
    delta, num_steps = 96, 40
    history = []
    for step in range(1, num_steps + 1):
        values = torch.randn(19, dtype=torch.float64) + step / 10
        _set_flat(net, values)
        history.append(values)
        ema.update(cur_nimg=step * delta, batch_size=delta)
    history = torch.stack(history)
    for std, (ema_net, suffix) in zip([0.05, 0.2], ema.get()):
        gamma = phema.std_to_exp(std)
        steps = np.arange(1, num_steps + 1, dtype=np.float64)
        weights = (steps ** (gamma + 1) - (steps - 1) ** (gamma + 1)) / num_steps ** (gamma + 1)
        expected = torch.from_numpy(weights) @ history
        assert torch.allclose(_flat(ema_net), expected, rtol=1e-10, atol=1e-12)
        assert suffix == f'-{std:.3f}'


def test_power_function_ema_buffers_state_and_reset():
    net = TinyNet()
    ema = phema.PowerFunctionEMA(net)
    _set_flat(net, torch.ones(19))
    net.marker.fill_(5)
    assert [suffix for _net, suffix in ema.get()] == ['-0.050', '-0.100']
    assert all(float(ema_net.marker) == 5 for ema_net, _suffix in ema.get())
    assert all(_flat(ema_net).abs().max() == 0 for ema_net, _suffix in ema.get())

    ema.update(cur_nimg=64, batch_size=64)  # the first update copies the net
    assert all(torch.equal(_flat(ema_net), _flat(net)) for ema_net, _suffix in ema.get())
    _set_flat(net, torch.full([19], 3.0))
    ema.update(cur_nimg=128, batch_size=64)
    state = copy.deepcopy(ema.state_dict())
    assert state['stds'] == [0.05, 0.1] and len(state['emas']) == 2

    other = phema.PowerFunctionEMA(TinyNet(), stds=[0.05, 0.1])
    other.load_state_dict(state)
    for (a, _), (b, _) in zip(ema.get(), other.get()):
        assert torch.equal(_flat(a), _flat(b))
    beta = (1 - 64 / 128) ** (phema.std_to_exp(0.05) + 1)
    assert _flat(other.emas[0])[0].item() == pytest.approx(beta * 1 + (1 - beta) * 3)

    ema.reset()
    assert all(torch.equal(_flat(ema_net), _flat(net)) for ema_net, _suffix in ema.get())
    with pytest.raises(ValueError, match='expected 1'):
        phema.PowerFunctionEMA(TinyNet(), stds=[0.1]).load_state_dict(state)


def test_traditional_ema_half_life_and_rampup():
    net = TinyNet().double()
    ema = phema.TraditionalEMA(net, halflife_Mimg=0.001, rampup_ratio=None)
    _set_flat(net, torch.full([19], 8.0, dtype=torch.float64))
    ema.update(cur_nimg=500, batch_size=500)  # half a half-life
    (ema_net, suffix), = ema.get()
    assert suffix == ''
    assert torch.allclose(_flat(ema_net), torch.full([19], 8.0 * (1 - 0.5 ** 0.5), dtype=torch.float64))

    fresh = TinyNet().double()
    ramped = phema.TraditionalEMA(fresh, halflife_Mimg=10, rampup_ratio=0.5)
    _set_flat(fresh, torch.full([19], 8.0, dtype=torch.float64))
    ramped.update(cur_nimg=2000, batch_size=1000)  # half-life min(10, 0.002 * 0.5) Mimg = 1000 images
    assert torch.allclose(_flat(ramped.ema), torch.full([19], 4.0, dtype=torch.float64))
    restored = phema.TraditionalEMA(TinyNet().double())
    restored.load_state_dict(ramped.state_dict())
    assert torch.equal(_flat(restored.ema), _flat(ramped.ema))


def test_solver_reproduces_an_input_profile_exactly():
    in_nimg = [1024, 1024, 2048, 2048, 3072, 3072]
    in_std = [0.05, 0.1] * 3
    coefs = phema.solve_posthoc_coefficients(in_nimg, in_std, 2048, [0.1, 0.07])
    assert coefs.shape == (6, 2) and coefs.dtype == np.float64
    assert np.allclose(coefs.sum(axis=0), 1)
    assert np.allclose(coefs[:, 0], [0, 0, 0, 1, 0, 0], atol=1e-8)
    assert np.allclose(coefs[4:, 1], 0, atol=1e-8)  # later snapshots cannot help an earlier profile


def test_parse_std_list():
    assert len(reconstruct_phema.parse_std_list('0.010,0.015,...,0.250')) == 49
    assert reconstruct_phema.parse_std_list('0.1, 0.05,0.1') == [0.05, 0.1]
    assert reconstruct_phema.parse_std_list('0.2,0.01,0.02,...,0.05') == [0.01, 0.02, 0.03, 0.04, 0.05, 0.2]
    for bad, message in [('0.01,...,0.05', 'two values'), ('0.01,0.02,...', 'two values'),
                         ('0.01,0.03,...,0.06', 'whole steps'), ('0.1,0.3', 'outside'), ('abc', 'not a number')]:
        with pytest.raises(ValueError, match=message):
            reconstruct_phema.parse_std_list(bad)


def test_kimg_to_nimg():
    assert reconstruct_phema.kimg_to_nimg(8388) == 8 << 20
    assert reconstruct_phema.kimg_to_nimg(1) == 1024
    with pytest.raises(ValueError, match='kimg 42'):
        reconstruct_phema.kimg_to_nimg(42)


@pytest.fixture(scope='module')
def phema_run(tmp_path_factory):
    """Snapshots of a synthetic run, plus the tracked EMA at std 0.070 at each snapshot time."""
    indir = tmp_path_factory.mktemp('run')
    torch.manual_seed(1)
    net = TinyNet().double()
    tracked = phema.PowerFunctionEMA(net, stds=[0.05, 0.07, 0.10])
    batch, steps_per_snapshot, num_snapshots = 256, 4, 16
    walk = torch.zeros(19, dtype=torch.float64)
    reference = {}
    for step in range(1, steps_per_snapshot * num_snapshots + 1):
        walk += 0.05 * torch.randn_like(walk)
        _set_flat(net, walk + torch.sin(torch.arange(19) + step / 10))
        tracked.update(cur_nimg=step * batch, batch_size=batch)
        if step % steps_per_snapshot == 0:
            nimg = step * batch
            for index, (ema_net, suffix) in enumerate(tracked.get()):
                ema_net.marker.fill_(nimg / 1024 + index / 4)
                if suffix == '-0.070':
                    reference[nimg] = _flat(ema_net)
                else:
                    data = dict(ema=copy.deepcopy(ema_net).float(), encoder=None,
                                dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path='x.zip'),
                                cd=dict(S=8, index=index))
                    save_pickle(data, indir / f'network-snapshot-{nimg // 1000:07d}{suffix}.pkl')
    # Files the filters must skip: a kimg-0 snapshot, another prefix and another std.
    for name in ['network-snapshot-0000000-0.050.pkl', 'other-0000016-0.050.pkl', 'network-snapshot-0000016-0.150.pkl']:
        (indir / name).write_bytes(b'not a pickle')
    return indir, reference


@pytest.mark.slow
def test_reconstruction_cli_recovers_tracked_ema(phema_run, tmp_path):
    indir, reference = phema_run
    outdir = tmp_path / 'out'

    def run_cli(*args):
        run_script('reconstruct_phema.py', f'--indir={indir}', f'--outdir={outdir}', '--inprefix=network-snapshot',
                   '--instd=0.05,0.1', *args)

    run_cli('--outstd=0.070,0.050,0.07', '--batch=1')
    assert sorted(os.listdir(outdir)) == ['phema-0000016-0.050.pkl', 'phema-0000016-0.070.pkl']
    last_nimg = 16 * 1024
    last_input = load_pickle(indir / 'network-snapshot-0000016-0.100.pkl')
    first_input = load_pickle(indir / 'network-snapshot-0000001-0.050.pkl')

    out = load_pickle(outdir / 'phema-0000016-0.070.pkl')
    assert set(out.keys()) == {'ema', 'encoder', 'dataset_kwargs', 'cd'}
    assert out['cd'] == first_input['cd'] and out['dataset_kwargs'] == first_input['dataset_kwargs']
    assert all(p.dtype == torch.float16 for p in out['ema'].parameters())
    assert float(out['ema'].marker) == float(last_input['ema'].marker)
    gap = (reference[last_nimg] - _flat(load_pickle(indir / 'network-snapshot-0000016-0.050.pkl')['ema'])).abs().max()
    error = (_flat(out['ema']) - reference[last_nimg]).abs().max()
    assert error < 0.02 * gap

    same = load_pickle(outdir / 'phema-0000016-0.050.pkl')
    tracked_050 = load_pickle(indir / 'network-snapshot-0000016-0.050.pkl')
    assert torch.allclose(_flat(same['ema']), _flat(tracked_050['ema']), atol=2e-3)

    (outdir / 'phema-0000008-0.060.pkl').write_bytes(b'sentinel')
    run_cli('--outstd=0.060,0.070', '--outkimg=8', '--skip')
    assert (outdir / 'phema-0000008-0.060.pkl').read_bytes() == b'sentinel'
    middle = load_pickle(outdir / 'phema-0000008-0.070.pkl')
    assert (_flat(middle['ema']) - reference[8192]).abs().max() < 0.02 * gap


def test_cli_rejects_bad_requests(phema_run, tmp_path):
    indir, _reference = phema_run
    base = [f'--indir={indir}', f'--outdir={tmp_path}', '--inprefix=network-snapshot', '--instd=0.05,0.1']
    cases = [(['--outstd=0.07', '--outkimg=42'], '--outkimg 42'),
             (['--outstd=0.3'], 'outside'),
             (['--outstd=0.07', '--inprefix=missing'], 'no snapshots')]
    for args, message in cases:
        result = invoke(reconstruct_phema.cmdline, *base, *args)
        assert result.exit_code != 0 and message in result.output, result.output
    result = invoke(reconstruct_phema.cmdline, *base, '--outstd=0.07', env={'WORLD_SIZE': '2'})
    assert result.exit_code != 0 and 'single process' in result.output
    assert os.listdir(tmp_path) == []


def _error_line(result):
    """The one-line message of a command stopped by a user error (no traceback, no bare 'Aborted!')."""
    assert 'Traceback' not in result.output and 'Aborted' not in result.output, result.output
    return assert_user_error(result, exit_code=None)


def test_std_lists_must_be_finite(tmp_path):
    for bad in ['nan', '0.05,inf', '0.01,0.02,...,nan', '-inf']:
        with pytest.raises(ValueError, match='not a finite number'):
            reconstruct_phema.parse_std_list(bad)
    for option in ['--outstd', '--instd']:
        args = [f'--indir={tmp_path}', f'--outdir={tmp_path}/out', '--outstd=0.07', f'{option}=0.05,nan']
        line = _error_line(invoke(reconstruct_phema.cmdline, *args))
        assert f"'{option}'" in line and 'not a finite number' in line
    assert os.listdir(tmp_path) == []


def test_cli_refuses_unreadable_snapshots_and_writes_nothing(phema_run, tmp_path):
    indir, _reference = phema_run
    good = indir / 'network-snapshot-0000008-0.050.pkl'
    whole = good.read_bytes()
    nan_data = load_pickle(good)
    with torch.no_grad():
        nan_data['ema'].weight[0, 0] = float('nan')
    net_only = load_pickle(good)
    net_only['net'] = net_only.pop('ema')
    contents = {'empty': b'', 'truncated': whole[:len(whole) // 2], 'random': np.random.default_rng(0).bytes(len(whole)),
                'list': pickle.dumps([1, 2]), 'nan': pickle.dumps(nan_data), 'no_ema': pickle.dumps(net_only)}
    expected = {'empty': 'empty or truncated', 'truncated': 'truncated', 'random': 'not a readable pickle',
                'list': 'not a network pickle', 'nan': 'non-finite', 'no_ema': 'has no "ema" network'}
    for case, data in contents.items():
        run_dir = tmp_path / case
        run_dir.mkdir()
        for path in indir.iterdir():
            (run_dir / path.name).write_bytes(path.read_bytes())
        (run_dir / good.name).write_bytes(data)
        outdir = tmp_path / f'{case}-out'
        args = [f'--indir={run_dir}', f'--outdir={outdir}', '--inprefix=network-snapshot', '--instd=0.05,0.1',
                '--outstd=0.06,0.07,0.08', '--batch=1']
        line = _error_line(invoke(reconstruct_phema.cmdline, *args))
        assert f'--indir snapshot: {run_dir / good.name}' in line and expected[case] in line, (case, line)
        assert not outdir.exists(), case


def test_cli_refuses_missing_or_empty_indir(tmp_path):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'file').write_bytes(b'')
    for indir, message in [(tmp_path / 'missing', 'does not exist'), (tmp_path / 'file', 'is not a directory'),
                           (tmp_path / 'empty', 'holds no snapshots')]:
        line = _error_line(invoke(reconstruct_phema.cmdline, f'--indir={indir}', f'--outdir={tmp_path}/out', '--outstd=0.07'))
        assert f'--indir: {indir}' in line and message in line
    assert sorted(os.listdir(tmp_path)) == ['empty', 'file']


def test_reconstructed_pickles_appear_atomically(phema_run, tmp_path, monkeypatch):
    indir, _reference = phema_run
    snapshots = reconstruct_phema.find_snapshots(str(indir), prefix='network-snapshot', stds=[0.05, 0.1])

    def dump_then_fail(obj, f):
        f.write(b'half a pickle')
        raise OSError('disk full')
    monkeypatch.setattr(reconstruct_phema.pickle, 'dump', dump_then_fail)
    with pytest.raises(OSError, match='disk full'):
        reconstruct_phema.reconstruct_phema(snapshots, [0.07], 16 * 1024, str(tmp_path / 'out'), verbose=False)
    assert os.listdir(tmp_path / 'out') == []
