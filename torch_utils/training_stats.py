"""Named scalar statistics gathered during training and summed across processes.

Each name accumulates three raw moments, [number of finite values, sum, sum of squares], in one
float64 counter per device. `Collector.update()` gathers those counters from every device and every
rank into a cumulative total on the CPU and reports the change since its previous update.
"""

import hashlib
import re

import numpy as np
import torch

import dnnlib
from . import misc

_element_dtype = torch.float32   # precision of the per-report reductions
_counter_dtype = torch.float64   # precision of the accumulated moments
_num_moments = 3

_rank = 0
_sync_device = None              # device used for the cross-rank all-reduce; None = single process
_has_synced = False
_counters = dict()               # name -> {device: moments}; dict order = order of first report
_totals = dict()                 # name -> cumulative moments over all ranks (CPU)


def init_multiprocessing(rank, sync_device):
    """Declare this process's rank and the device for cross-rank reduction (None disables it)."""
    global _rank, _sync_device
    if _has_synced and (rank, sync_device) != (_rank, _sync_device):
        raise RuntimeError(f'training_stats.init_multiprocessing(rank={rank}, sync_device={sync_device}) came after '
                           f'statistics were already synced with rank={_rank}, sync_device={_sync_device}')
    _rank = rank
    _sync_device = sync_device


def _moments_of(elems):
    elems = elems.detach().flatten().to(_element_dtype)
    finite = torch.isfinite(elems)
    elems = torch.where(finite, elems, torch.zeros_like(elems))
    return torch.stack([finite.sum(dtype=_element_dtype), elems.sum(), elems.square().sum()]).to(_counter_dtype)


@misc.profiled_function
def report(name, value):
    """Add the finite elements of `value` (scalar, sequence, array or tensor) to statistic `name`."""
    per_device = _counters.setdefault(name, dict())
    elems = torch.as_tensor(value)
    if elems.numel() == 0:
        return value
    moments = _moments_of(elems)
    if moments.device not in per_device:
        per_device[moments.device] = torch.zeros_like(moments)
    per_device[moments.device].add_(moments)
    return value


def report0(name, value):
    """Like report(), but only rank 0 contributes data; other ranks just register the name."""
    report(name, value if _rank == 0 else [])
    return value


def _names_digest(names):
    digest = hashlib.sha256('\n'.join(names).encode('utf-8')).digest()
    return int.from_bytes(digest[:8], 'little', signed=True)


def _check_same_names(names):
    # Python's str hash is salted per process, so the comparison uses a stable digest instead.
    local = torch.tensor([_names_digest(names)], dtype=torch.int64, device=_sync_device)
    reference = local.clone()
    torch.distributed.broadcast(reference, src=0)
    mismatches = (local != reference).to(torch.int64)
    torch.distributed.all_reduce(mismatches)
    if int(mismatches.item()) != 0:
        raise ValueError(f'training_stats: ranks reported different statistic names or orders; rank {_rank} has {names}')


def _sync(names):
    """Fold this process's new moments for `names` into the global totals and return those totals."""
    global _has_synced
    if _sync_device is not None:
        _check_same_names(names)
    if len(names) == 0:
        return []
    _has_synced = True
    device = _sync_device if _sync_device is not None else torch.device('cpu')
    deltas = torch.zeros([len(names), _num_moments], dtype=_counter_dtype, device=device)
    for row, name in enumerate(names):
        for moments in _counters[name].values():
            deltas[row].add_(moments.to(device))
            moments.zero_()
    if _sync_device is not None:
        torch.distributed.all_reduce(deltas)
    deltas = deltas.cpu()
    for row, name in enumerate(names):
        _totals.setdefault(name, torch.zeros([_num_moments], dtype=_counter_dtype)).add_(deltas[row])
    return [(name, _totals[name]) for name in names]


class Collector:
    """Per-interval view of the statistics whose names fully match `regex`.

    Every rank must call update() at the same points, since it synchronizes across ranks.
    With `keep_previous`, a name that received no new data keeps the values of its last interval.
    """

    def __init__(self, regex='.*', keep_previous=False):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._seen = dict()      # name -> totals at this collector's previous update
        self._interval = dict()  # name -> moments of the latest interval

    def names(self):
        return [name for name in _counters if self._regex.fullmatch(name)]

    def update(self):
        if not self._keep_previous:
            self._interval.clear()
        for name, total in _sync(self.names()):
            previous = self._seen.get(name, torch.zeros_like(total))
            delta = total - previous
            self._seen[name] = total.clone()
            if delta[0] != 0:
                self._interval[name] = delta

    def num(self, name):
        moments = self._interval.get(name)
        return 0 if moments is None else int(moments[0])

    def mean(self, name):
        count = self.num(name)
        if count == 0:
            return float('nan')
        return float(self._interval[name][1] / count)

    def std(self, name):
        count = self.num(name)
        if count == 0:
            return float('nan')
        if count == 1:
            return 0.0
        _, total, total_sq = self._interval[name].tolist()
        mean = total / count
        variance = max(total_sq / count - mean ** 2, 0.0)
        return float(np.sqrt(variance))

    def as_dict(self):
        return dnnlib.EasyDict({name: dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
                                for name in self.names()})

    def __getitem__(self, name):
        return self.mean(name)


default_collector = Collector()
