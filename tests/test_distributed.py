import json
import os
import signal
import subprocess
import time

import pytest
import torch

import dnnlib
from helpers import run_script, script_command, torchrun
from torch_utils import distributed as dist


class _Counter:
    def __init__(self):
        self.ticks = 0
        self.label = 'start'


class _FailsToPickle:
    def __reduce__(self):
        raise RuntimeError('refusing to be pickled')


def _make_objects(seed):
    torch.manual_seed(seed)
    net = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    return dict(net=net, optimizer=optimizer, options={'P_mean': -0.4, 'sizes': [1, 2]},
                state=dnnlib.EasyDict(cur_nimg=2048, total_elapsed_time=12.5), counter=_Counter(), nothing=None)


def test_round_trip_restores_every_kind_of_object(tmp_path):
    objs = _make_objects(seed=0)
    objs['counter'].ticks = 7
    expected_net = {k: v.clone() for k, v in objs['net'].state_dict().items()}
    expected_adam = objs['optimizer'].state_dict()['state'][0]['exp_avg_sq'].clone()
    dist.CheckpointIO(**objs).save(str(tmp_path / 'training-state-0002048.pt'), verbose=False)

    restored = _make_objects(seed=1)
    restored['options']['stale'] = True
    restored['state'].cur_nimg = 0
    dist.CheckpointIO(**restored).load(str(tmp_path / 'training-state-0002048.pt'), verbose=False)

    for name, value in restored['net'].state_dict().items():
        assert torch.equal(value, expected_net[name])
    adam_state = restored['optimizer'].state_dict()['state'][0]
    assert torch.equal(adam_state['exp_avg_sq'], expected_adam)
    assert int(adam_state['step']) == 1
    assert restored['options'] == {'P_mean': -0.4, 'sizes': [1, 2]}
    assert restored['state'] == dict(cur_nimg=2048, total_elapsed_time=12.5)
    assert restored['counter'].ticks == 7 and restored['counter'].label == 'start'

    raw = torch.load(tmp_path / 'training-state-0002048.pt', weights_only=False)
    assert list(raw.keys()) == ['net', 'optimizer', 'options', 'state', 'counter', 'nothing']
    assert isinstance(raw['state'], dnnlib.EasyDict) and raw['nothing'] is None


def test_load_reports_missing_entries(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    dist.CheckpointIO(a={'x': 1}).save(path, verbose=False)
    with pytest.raises(ValueError, match=r"ckpt.pt is not a training state of this kind of run: it has no entry for \['b'\]"):
        dist.CheckpointIO(a={}, b={}).load(path, verbose=False)


def test_load_latest_picks_largest_number(tmp_path, capsys):
    for number in [9, 10, 2]:
        dist.CheckpointIO(value={'number': number}).save(str(tmp_path / f'training-state-{number}.pt'))
    (tmp_path / 'training-state-99.pt.bak').write_bytes(b'not a checkpoint')
    (tmp_path / 'other-1000.pt').write_bytes(b'not a checkpoint')
    value = {}
    path = dist.CheckpointIO(value=value).load_latest(str(tmp_path))
    assert path == str(tmp_path / 'training-state-10.pt')
    assert value == {'number': 10}
    assert f'Loading {path} ... done' in capsys.readouterr().out

    custom = dist.CheckpointIO(value=value).load_latest(str(tmp_path), pattern=r'training-state-(\d)\.pt', verbose=False)
    assert custom.endswith('training-state-9.pt') and value == {'number': 9}

    empty = tmp_path / 'empty'
    empty.mkdir()
    assert dist.CheckpointIO(value={}).load_latest(str(empty)) is None


def test_failed_save_keeps_previous_file(tmp_path):
    path = str(tmp_path / 'training-state-0000004.pt')
    net = torch.nn.Linear(2, 2)
    good = {k: v.clone() for k, v in net.state_dict().items()}
    dist.CheckpointIO(net=net, extra={'ok': True}).save(path, verbose=False)
    dist.CheckpointIO(net=net, extra={'ok': True}).save(str(tmp_path / 'training-state-0000002.pt'), verbose=False)

    with torch.no_grad():
        net.weight.fill_(123.0)
    broken = dist.CheckpointIO(net=net, extra={'ok': False, 'bad': _FailsToPickle()})
    with pytest.raises(RuntimeError, match='refusing'):
        broken.save(path, verbose=False)
    with pytest.raises(RuntimeError, match='refusing'):
        broken.save(str(tmp_path / 'training-state-0000008.pt'), verbose=False)

    assert sorted(os.listdir(tmp_path)) == ['training-state-0000002.pt', 'training-state-0000004.pt']
    fresh, extra = torch.nn.Linear(2, 2), {}
    assert dist.CheckpointIO(net=fresh, extra=extra).load_latest(str(tmp_path), verbose=False) == path
    assert torch.equal(fresh.weight, good['weight']) and extra == {'ok': True}


_SLOW_SAVER = r'''
import sys
import torch
from torch_utils import distributed as dist
run_dir = sys.argv[1]
dist.CheckpointIO(data={'step': 1}).save(run_dir + '/training-state-0000001.pt', verbose=False)
big = {'step': 2, 'weights': torch.ones(32 << 20)}
print('ready', flush=True)
dist.CheckpointIO(data=big).save(run_dir + '/training-state-0000002.pt', verbose=False)
'''


def test_killed_save_leaves_loadable_checkpoint(tmp_path, subprocess_env, repo_root):
    script = tmp_path / 'saver.py'
    script.write_text(_SLOW_SAVER)
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    proc = subprocess.Popen(script_command(script, run_dir), env=subprocess_env, cwd=repo_root, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == 'ready'
        deadline = time.time() + 60
        partial = []
        while not partial and time.time() < deadline and proc.poll() is None:
            partial = [name for name in os.listdir(run_dir) if name.endswith('.tmp') and os.path.getsize(run_dir / name) > 0]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert partial, 'the save finished before it could be interrupted'
    assert proc.returncode == -signal.SIGKILL

    # The half-written temp file remains, but it is never mistaken for a checkpoint.
    assert any(name.endswith('.tmp') for name in os.listdir(run_dir))
    data = {}
    path = dist.CheckpointIO(data=data).load_latest(str(run_dir), verbose=False)
    assert path == str(run_dir / 'training-state-0000001.pt')
    assert data == {'step': 1}
    assert not os.path.exists(run_dir / 'training-state-0000002.pt')


_INIT_WORKER = r'''
import atexit, json, os, sys, time
import torch
from torch_utils import distributed as dist
from torch_utils import training_stats

def record_group_at_exit():  # registered before init(), so it runs after init()'s exit handler
    with open(sys.argv[1] + '/exit%s.json' % os.environ.get('RANK', '0'), 'w') as f:
        json.dump(dict(destroyed=not torch.distributed.is_initialized(), wait=time.monotonic() - script_end), f)
atexit.register(record_group_at_exit)
dist.init()
# A DDP wrapper keeps the group alive past destroy_process_group(); the exit handler must still be safe.
ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
dist.print0('hello from rank', dist.get_rank())
dist.CheckpointIO(info={'writer': dist.get_rank()}).save(sys.argv[1] + '/shared.pt', verbose=False)
torch.distributed.barrier()
result = dict(rank=dist.get_rank(), world=dist.get_world_size(), backend=torch.distributed.get_backend(),
              sync_device=str(training_stats._sync_device), env={k: os.environ[k] for k in ['MASTER_ADDR', 'RANK', 'LOCAL_RANK', 'WORLD_SIZE']},
              hooks=[dist.should_stop(), dist.should_suspend(), dist.request_suspend(), dist.update_progress(1, 2)])
with open(sys.argv[1] + '/rank%d.json' % dist.get_rank(), 'w') as f:
    json.dump(result, f)
script_end = time.monotonic()
'''


def _run_init_worker(tmp_path, env=None, launcher=()):
    script = tmp_path / 'init_worker.py'
    script.write_text(_INIT_WORKER)
    return run_script(script, tmp_path, env=env, launcher=launcher).stdout


def test_init_as_plain_process(tmp_path, subprocess_env):
    env = {k: v for k, v in subprocess_env.items() if k not in ['MASTER_ADDR', 'MASTER_PORT', 'RANK', 'LOCAL_RANK', 'WORLD_SIZE']}
    stdout = _run_init_worker(tmp_path, env)
    assert stdout.count('hello from rank 0') == 1
    result = json.loads((tmp_path / 'rank0.json').read_text())
    assert result['rank'] == 0 and result['world'] == 1 and result['backend'] == 'gloo'
    assert result['sync_device'] == 'None'
    assert result['env'] == dict(MASTER_ADDR='localhost', RANK='0', LOCAL_RANK='0', WORLD_SIZE='1')
    assert result['hooks'] == [False, False, None, None]
    assert json.loads((tmp_path / 'exit0.json').read_text())['destroyed']


@pytest.mark.slow
def test_init_under_torchrun(tmp_path):
    stdout = _run_init_worker(tmp_path, launcher=torchrun())
    assert 'hello from rank 0' in stdout and 'hello from rank 1' not in stdout
    for rank in range(2):
        result = json.loads((tmp_path / f'rank{rank}.json').read_text())
        assert result['rank'] == rank and result['world'] == 2 and result['backend'] == 'gloo'
        assert result['sync_device'] == 'cpu'
        exit_info = json.loads((tmp_path / f'exit{rank}.json').read_text())
        # Gloo's worker threads get time to release the last collective before interpreter shutdown.
        assert exit_info['destroyed'] and exit_info['wait'] >= dist.GLOO_EXIT_GRACE_S
    assert torch.load(tmp_path / 'shared.pt', weights_only=False) == {'info': {'writer': 0}}
