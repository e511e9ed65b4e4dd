"""Tests for torch_utils.misc."""

import textwrap

import numpy as np
import pytest
import torch

from helpers import run_script, torchrun
from torch_utils import misc


def test_set_random_seed_reference_values():
    misc.set_random_seed(0, 0)
    assert torch.initial_seed() == 397586535
    assert np.random.get_state()[1][0] == 397586535
    misc.set_random_seed(0, 0, 0)
    assert torch.initial_seed() == 360982090
    first = (torch.rand(3), np.random.rand(3))
    misc.set_random_seed(0, 0, 0)
    assert torch.equal(torch.rand(3), first[0]) and np.array_equal(np.random.rand(3), first[1])


def _reference_stream(num_items, seed, start, step, count):
    """Global index p -> permutation of epoch p // N, seeded as RandomState(hash((seed, epoch)) % 2^31)."""
    out = []
    for pos in range(start, start + step * count, step):
        perm = np.random.RandomState(hash((seed, pos // num_items)) % 2**31).permutation(num_items)
        out.append(int(perm[pos % num_items]))
    return out


def _take(sampler, count):
    it = iter(sampler)
    return [next(it) for _ in range(count)]


def test_infinite_sampler_order():
    data = list(range(7))
    assert _take(misc.InfiniteSampler(data, seed=3), 20) == _reference_stream(7, 3, 0, 1, 20)
    assert _take(misc.InfiniteSampler(data, seed=3, start_idx=11), 9) == _reference_stream(7, 3, 11, 1, 9)
    ranks = [_take(misc.InfiniteSampler(data, rank=r, num_replicas=3, seed=5, start_idx=4), 6) for r in range(3)]
    for r in range(3):
        assert ranks[r] == _reference_stream(7, 5, 4 + r, 3, 6)
    assert _take(misc.InfiniteSampler(data, shuffle=False, start_idx=5), 4) == [5, 6, 0, 1]
    first_epoch = _take(misc.InfiniteSampler(data, seed=9), 7)
    assert sorted(first_epoch) == data and first_epoch != data


def test_infinite_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError):
        misc.InfiniteSampler([])
    with pytest.raises(ValueError, match='rank 2'):
        misc.InfiniteSampler([1], rank=2, num_replicas=2)


def test_constant_is_cached_and_typed():
    a = misc.constant([1, 2, 3], dtype=torch.float64)
    assert a.dtype == torch.float64 and a.tolist() == [1.0, 2.0, 3.0]
    assert misc.constant([1, 2, 3], dtype=torch.float64) is a
    assert misc.constant([1, 2, 4], dtype=torch.float64) is not a
    assert misc.constant(1.5).dtype == torch.get_default_dtype() and misc.constant(1.5).device.type == 'cpu'
    b = misc.constant([1.0, 2.0], shape=[3, 2])
    assert b.shape == (3, 2) and b.is_contiguous() and b[2].tolist() == [1.0, 2.0]
    ref = torch.zeros(2, dtype=torch.float16)
    c = misc.const_like(ref, np.outer([1, 2], [1, 3]))
    assert c.dtype == torch.float16 and c.tolist() == [[1, 3], [2, 6]]
    assert misc.const_like(ref, 2, dtype=torch.int32).dtype == torch.int32


def test_assert_shape():
    x = torch.zeros(2, 3, 4)
    misc.assert_shape(x, [2, None, 4])
    with pytest.raises(AssertionError, match='dimension 1'):
        misc.assert_shape(x, [2, 5, 4])
    with pytest.raises(AssertionError, match='3-dimensional'):
        misc.assert_shape(torch.zeros(2), [None, None, None])


def test_profiled_function_and_pinned_buf():
    @misc.profiled_function
    def double(v):
        return 2 * v
    assert double.__name__ == 'double' and double(4) == 8
    buf = misc.pinned_buf((2, 3), torch.float32)
    assert buf.shape == (2, 3) and misc.pinned_buf((2, 3), torch.float32) is buf


def test_params_and_buffers_order_and_copy():
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    dst = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    src[1].running_mean.fill_(0.5)
    names = [name for name, _ in misc.named_params_and_buffers(src)]
    assert names == ['0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean', '1.running_var', '1.num_batches_tracked']
    assert len(misc.params_and_buffers(src)) == len(names)
    misc.copy_params_and_buffers(src, dst, require_all=True)
    for (_, a), (_, b) in zip(misc.named_params_and_buffers(src), misc.named_params_and_buffers(dst)):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert dst[0].weight.requires_grad

    bigger = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 2))
    misc.copy_params_and_buffers(src, bigger)
    assert torch.equal(bigger[0].weight, src[0].weight)
    with pytest.raises(KeyError, match='2.weight'):
        misc.copy_params_and_buffers(src, bigger, require_all=True)


class _TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU())
        self.head = torch.nn.Linear(8, 3)
        self.register_buffer('scale', torch.ones(5))

    def forward(self, x):
        h = self.body(x)
        return self.head(h), h.half()


def test_print_module_summary(capsys):
    net = _TwoHeads()
    out = misc.print_module_summary(net, [torch.zeros(2, 4)])
    assert isinstance(out, tuple) and out[0].shape == (2, 3)
    lines = capsys.readouterr().out.split('\n')
    assert lines[0] == '' and lines[-2:] == ['', '']
    rows = [line.split() for line in lines[1:-2]]
    assert rows == [
        ['_TwoHeads', 'Parameters', 'Buffers', 'Output', 'shape', 'Datatype'],
        ['---'] * 5,
        ['body.0', '40', '-', '[2,', '8]', 'float32'],
        ['body.1', '-', '-', '[2,', '8]', 'float32'],
        ['head', '27', '-', '[2,', '3]', 'float32'],
        ['<top-level>:0', '-', '5', '[2,', '3]', 'float32'],
        ['<top-level>:1', '-', '-', '[2,', '8]', 'float16'],
        ['---'] * 5,
        ['Total', '67', '5', '-', '-'],
    ]
    # Columns are padded to a common width and separated by two spaces.
    header, first = lines[1], lines[3]
    assert header == '_TwoHeads      Parameters  Buffers  Output shape  Datatype'
    assert first == 'body.0         40          -        [2, 8]        float32 '

    misc.print_module_summary(net, [torch.zeros(2, 4)], max_nesting=1, skip_redundant=False)
    names = [line.split()[0] for line in capsys.readouterr().out.strip().split('\n')[2:-2]]
    assert names == ['body', 'head', '<top-level>:0', '<top-level>:1']


def test_tile_images():
    x = torch.arange(6).reshape(6, 1, 1, 1).expand(6, 2, 2, 3)
    grid = misc.tile_images(x, w=3, h=2)
    assert grid.shape == (2, 4, 9)
    assert grid[0, ::2, ::3].tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError):
        misc.tile_images(x, w=4, h=2)


def test_ddp_helpers_without_process_group():
    net = torch.nn.Linear(2, 2)
    with misc.ddp_sync(net, sync=False):
        net(torch.ones(1, 2)).sum().backward()
    assert net.weight.grad is not None
    misc.check_ddp_consistency(net)


DDP_SCRIPT = textwrap.dedent('''
    import torch
    from torch_utils import distributed as dist
    from torch_utils import misc
    dist.init()
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1, bias=False)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    misc.check_ddp_consistency(ddp)
    x = torch.full([1, 2], float(rank + 1))
    with misc.ddp_sync(ddp, sync=False):
        ddp(x).sum().backward()
    local = net.weight.grad.clone()
    net.weight.grad = None
    with misc.ddp_sync(ddp, sync=True):
        ddp(x).sum().backward()
    print(f'rank{rank} local={local.tolist()} synced={net.weight.grad.tolist()}', flush=True)
    with torch.no_grad():
        net.weight.add_(rank)
    try:
        misc.check_ddp_consistency(ddp, ignore_regex=None)
        print(f'rank{rank} consistent', flush=True)
    except AssertionError as err:
        print(f'rank{rank} mismatch {err}', flush=True)
    misc.check_ddp_consistency(ddp, ignore_regex=r'.*weight')
    print(f'rank{rank} ignored-ok', flush=True)
''')


@pytest.mark.slow
def test_ddp_helpers_under_torchrun(tmp_path):
    script = tmp_path / 'ddp_check.py'
    script.write_text(DDP_SCRIPT)
    out = run_script(script, launcher=torchrun()).stdout
    assert 'rank0 local=[[1.0, 1.0]] synced=[[1.5, 1.5]]' in out
    assert 'rank1 local=[[2.0, 2.0]] synced=[[1.5, 1.5]]' in out
    assert 'rank0 consistent' in out
    assert 'rank1 mismatch DistributedDataParallel.module.weight' in out
    assert 'rank0 ignored-ok' in out and 'rank1 ignored-ok' in out
