"""Tensor and module helpers used across training, sampling and evaluation."""

import contextlib
import functools
import re
import warnings

import numpy as np
import torch

import dnnlib

#----------------------------------------------------------------------------
# Devices and seeding.


def default_device():
    """CUDA (this process's current GPU) when available, else the CPU."""
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def set_random_seed(*args):
    """Seed torch and numpy from any hashable values; ints give the same seed in every process."""
    seed = hash(args) % (1 << 31)
    torch.manual_seed(seed)
    np.random.seed(seed)

#----------------------------------------------------------------------------
# Cached constant tensors.

_constants = dict()


def constant(value, shape=None, dtype=None, device=None, memory_format=None):
    """Tensor holding `value`, optionally broadcast to `shape`; built once per distinct request.

    The result is shared between callers and must not be modified in place.
    """
    value = np.asarray(value)
    shape = tuple(shape) if shape is not None else None
    dtype = torch.get_default_dtype() if dtype is None else dtype
    device = torch.device('cpu') if device is None else torch.device(device)
    memory_format = torch.contiguous_format if memory_format is None else memory_format

    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    if key not in _constants:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor = tensor.expand(shape)
        _constants[key] = tensor.contiguous(memory_format=memory_format)
    return _constants[key]


def const_like(ref, value, shape=None, dtype=None, device=None, memory_format=None):
    """constant() with the dtype and device of `ref` unless given explicitly."""
    dtype = ref.dtype if dtype is None else dtype
    device = ref.device if device is None else device
    return constant(value, shape=shape, dtype=dtype, device=device, memory_format=memory_format)


@functools.lru_cache(maxsize=None)
def pinned_buf(shape, dtype):
    """Reusable staging buffer for host-to-device copies (page-locked when CUDA is present)."""
    buf = torch.empty(shape, dtype=dtype)
    return buf.pin_memory() if torch.cuda.is_available() else buf

#----------------------------------------------------------------------------
# Shape checks that also work under tracing.

symbolic_assert = torch._assert # pylint: disable=protected-access


@contextlib.contextmanager
def suppress_tracer_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', category=torch.jit.TracerWarning)
        yield


def assert_shape(tensor, ref_shape):
    """Check tensor.shape against ref_shape, where None matches any size."""
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'Expected a {len(ref_shape)}-dimensional tensor, got shape {list(tensor.shape)}')
    for dim, (size, expected) in enumerate(zip(tensor.shape, ref_shape)):
        if expected is None:
            continue
        if isinstance(size, torch.Tensor) or isinstance(expected, torch.Tensor):
            with suppress_tracer_warnings():
                same = torch.equal(torch.as_tensor(size), torch.as_tensor(expected))
                symbolic_assert(same, f'Size mismatch in dimension {dim}: expected {expected}')
        elif size != expected:
            raise AssertionError(f'Size mismatch in dimension {dim}: got {size}, expected {expected}')


def profiled_function(fn):
    """Decorator: show calls of fn as a named range in the torch profiler."""
    @functools.wraps(fn)
    def profiled(*args, **kwargs):
        with torch.autograd.profiler.record_function(fn.__name__):
            return fn(*args, **kwargs)
    return profiled

#----------------------------------------------------------------------------


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of dataset indices, reshuffled every epoch and split between ranks.

    Position p of the global stream (p = start_idx + rank, then steps of num_replicas) belongs to
    epoch p // N and yields order[p % N], where order is arange(N) shuffled with the seed
    hash((seed, epoch)). Restarting with start_idx = images seen so far continues the stream exactly.
    """

    def __init__(self, dataset, rank=0, num_replicas=1, shuffle=True, seed=0, start_idx=0):
        if len(dataset) < 1:
            raise ValueError('InfiniteSampler needs a non-empty dataset')
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f'InfiniteSampler: rank {rank} is invalid for num_replicas={num_replicas}')
        super().__init__()
        self.dataset, self.shuffle, self.seed = dataset, shuffle, seed
        self.rank, self.num_replicas, self.start_idx = rank, num_replicas, start_idx

    def _epoch_order(self, epoch):
        order = np.arange(len(self.dataset))
        if self.shuffle:
            np.random.RandomState(hash((self.seed, epoch)) % (1 << 31)).shuffle(order)
        return order

    def __iter__(self):
        num_items = len(self.dataset)
        pos = self.start_idx + self.rank
        epoch, order = None, None
        while True:
            if pos // num_items != epoch:
                epoch = pos // num_items
                order = self._epoch_order(epoch)
            yield int(order[pos % num_items])
            pos += self.num_replicas

#----------------------------------------------------------------------------
# Parameters and buffers.


def params_and_buffers(module):
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f'Expected a torch.nn.Module, got {type(module).__name__}')
    return list(module.parameters()) + list(module.buffers())


def named_params_and_buffers(module):
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f'Expected a torch.nn.Module, got {type(module).__name__}')
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def copy_params_and_buffers(src_module, dst_module, require_all=False):
    """Copy tensor values from src_module into the same-named tensors of dst_module."""
    src_tensors = dict(named_params_and_buffers(src_module))
    for name, dst in named_params_and_buffers(dst_module):
        if name in src_tensors:
            dst.copy_(src_tensors[name])
        elif require_all:
            raise KeyError(f"copy_params_and_buffers: source module has no tensor named '{name}'")

#----------------------------------------------------------------------------
# Distributed data parallel.


def unwrap_ddp(net):
    """The module inside a DistributedDataParallel wrapper, or `net` itself when it is not wrapped."""
    return net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net


@contextlib.contextmanager
def ddp_sync(module, sync):
    """Suppress DDP gradient all-reduce when sync is False (e.g. for all but the last accumulation round)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f'Expected a torch.nn.Module, got {type(module).__name__}')
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield


def check_ddp_consistency(module, ignore_regex=None):
    """Verify that every rank holds the same parameters and buffers as rank 0."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f'Expected a torch.nn.Module, got {type(module).__name__}')
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    for name, tensor in named_params_and_buffers(module):
        full_name = f'{type(module).__name__}.{name}'
        if ignore_regex is not None and re.fullmatch(ignore_regex, full_name):
            continue
        local = tensor.detach()
        if local.is_floating_point():
            local = torch.nan_to_num(local) # NaN != NaN would fail the comparison below
        from_rank0 = local.clone()
        torch.distributed.broadcast(from_rank0, src=0)
        if not torch.equal(local, from_rank0):
            raise AssertionError(f'{full_name} differs between rank {torch.distributed.get_rank()} and rank 0')

#----------------------------------------------------------------------------
# Module summary table.


def _collect_calls(module, inputs, max_nesting):
    """Run module(*inputs) and record (submodule, output tensors) as each call up to max_nesting returns."""
    depth = [0]
    calls = []

    def enter(_mod, _inputs):
        depth[0] += 1

    def leave(mod, _inputs, outputs):
        depth[0] -= 1
        if depth[0] <= max_nesting:
            outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            calls.append(dnnlib.EasyDict(mod=mod, outputs=[t for t in outputs if isinstance(t, torch.Tensor)]))

    handles = []
    for mod in module.modules():
        handles.append(mod.register_forward_pre_hook(enter))
        handles.append(mod.register_forward_hook(leave))
    try:
        result = module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return result, calls


def _format_table(rows):
    widths = [max(len(cell) for cell in column) for column in zip(*rows)]
    return ['  '.join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]


def print_module_summary(module, inputs, max_nesting=3, skip_redundant=True):
    """Print parameter/buffer counts and output shapes of module and its submodules for one forward pass.

    Parameters and buffers are counted for the first call (in completion order) that owns them.
    With skip_redundant, a call is listed only if it owns a tensor or returns one not returned
    before. Returns the outputs of the forward pass.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f'Expected a torch.nn.Module, got {type(module).__name__}')
    if isinstance(module, torch.jit.ScriptModule):
        raise TypeError('print_module_summary does not support TorchScript modules')
    if not isinstance(inputs, (tuple, list)):
        raise TypeError(f'inputs must be a tuple or list of arguments, got {type(inputs).__name__}')

    result, calls = _collect_calls(module, inputs, max_nesting)
    seen = set()
    for call in calls:
        call.params = [t for t in call.mod.parameters() if id(t) not in seen]
        call.buffers = [t for t in call.mod.buffers() if id(t) not in seen]
        call.new_outputs = [t for t in call.outputs if id(t) not in seen]
        seen.update(id(t) for t in call.params + call.buffers + call.new_outputs)
    if skip_redundant:
        calls = [c for c in calls if c.params or c.buffers or c.new_outputs]

    names = {mod: name for name, mod in module.named_modules()}
    count = lambda n: str(n) if n else '-'
    rows = [[type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype'], ['---'] * 5]
    total_params, total_buffers = 0, 0
    for call in calls:
        name = '<top-level>' if call.mod is module else names[call.mod]
        num_params = sum(t.numel() for t in call.params)
        num_buffers = sum(t.numel() for t in call.buffers)
        total_params += num_params
        total_buffers += num_buffers
        shapes = [str(list(t.shape)) for t in call.outputs] or ['-']
        dtypes = [str(t.dtype).split('.')[-1] for t in call.outputs] or ['-']
        suffix = ':0' if len(call.outputs) > 1 else ''
        rows.append([name + suffix, count(num_params), count(num_buffers), shapes[0], dtypes[0]])
        rows += [[f'{name}:{idx}', '-', '-', shapes[idx], dtypes[idx]] for idx in range(1, len(call.outputs))]
    rows += [['---'] * 5, ['Total', str(total_params), str(total_buffers), '-', '-']]

    print()
    for line in _format_table(rows):
        print(line)
    print()
    return result

#----------------------------------------------------------------------------


def tile_images(x, w, h):
    """Arrange an NCHW batch of N = w*h images into one CHW image, h rows by w columns."""
    num, channels, height, width = x.shape
    if num != w * h:
        raise ValueError(f'tile_images: cannot tile {num} images as {w}x{h}')
    x = x.reshape(h, w, channels, height, width).permute(2, 0, 3, 1, 4)
    return x.reshape(channels, h * height, w * width)

#----------------------------------------------------------------------------
