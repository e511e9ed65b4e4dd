import json
import math

import numpy as np
import pytest
import torch

from helpers import run_script, torchrun
from torch_utils import training_stats


def test_moments_of_mixed_inputs_exclude_non_finite():
    training_stats.report('StatsA/loss', [1.0, float('nan'), 3.0, float('inf')])
    training_stats.report('StatsA/loss', np.array([[5.0, -float('inf')]]))
    training_stats.report('StatsA/loss', torch.tensor([7.0, 9.0]))
    training_stats.report('StatsA/loss', 11)
    training_stats.report('StatsA/other', torch.full([3], 2.0))
    collector = training_stats.Collector(regex='StatsA/.*')
    collector.update()

    kept = np.array([1.0, 3.0, 5.0, 7.0, 9.0, 11.0])
    assert collector.names() == ['StatsA/loss', 'StatsA/other']
    assert collector.num('StatsA/loss') == 6
    assert collector.mean('StatsA/loss') == pytest.approx(kept.mean())
    assert collector.std('StatsA/loss') == pytest.approx(kept.std())
    assert collector['StatsA/other'] == pytest.approx(2.0)
    assert collector.std('StatsA/other') == pytest.approx(0.0, abs=1e-7)

    stats = collector.as_dict()
    assert isinstance(stats, dict) and stats['StatsA/loss'].num == 6
    assert stats['StatsA/loss'].mean == pytest.approx(6.0)


def test_report_returns_value_and_empty_report_only_registers():
    value = torch.tensor([1.5, 2.5])
    assert training_stats.report('StatsB/x', value) is value
    assert training_stats.report('StatsB/empty', []) == []
    collector = training_stats.Collector(regex='StatsB/.*')
    collector.update()
    assert collector.names() == ['StatsB/x', 'StatsB/empty']
    assert collector.num('StatsB/empty') == 0
    assert math.isnan(collector.mean('StatsB/empty'))
    assert math.isnan(collector.std('StatsB/empty'))
    assert collector.num('StatsB/x') == 2


def test_single_value_has_zero_std_and_report0_reports_on_rank0():
    training_stats.report0('StatsC/one', 0.1)
    collector = training_stats.Collector(regex='StatsC/.*')
    collector.update()
    assert collector.num('StatsC/one') == 1
    assert collector.std('StatsC/one') == 0.0
    assert collector.mean('StatsC/one') == pytest.approx(0.1)


def test_collectors_see_intervals_independently():
    fresh = training_stats.Collector(regex='StatsD/.*')
    sticky = training_stats.Collector(regex='StatsD/.*', keep_previous=True)
    late = training_stats.Collector(regex='StatsD/.*')

    training_stats.report('StatsD/v', [1.0, 3.0])
    fresh.update()
    sticky.update()
    assert fresh.mean('StatsD/v') == pytest.approx(2.0)

    # No new data: the plain collector forgets, the keep_previous one keeps its last interval.
    fresh.update()
    sticky.update()
    assert fresh.num('StatsD/v') == 0
    assert sticky.mean('StatsD/v') == pytest.approx(2.0)

    training_stats.report('StatsD/v', [10.0])
    fresh.update()
    late.update()  # first update of this collector: sees everything reported so far
    assert fresh.mean('StatsD/v') == pytest.approx(10.0)
    assert late.num('StatsD/v') == 3
    assert late.mean('StatsD/v') == pytest.approx(14.0 / 3)


def test_regex_must_match_whole_name():
    training_stats.report('StatsE/abc', 1.0)
    training_stats.report('StatsE/abcd', 2.0)
    collector = training_stats.Collector(regex='StatsE/abc')
    collector.update()
    assert collector.names() == ['StatsE/abc']
    assert collector['StatsE/abc'] == 1.0


def test_late_init_may_not_change_settings():
    training_stats.report('StatsF/x', 1.0)
    training_stats.Collector(regex='StatsF/.*').update()
    training_stats.init_multiprocessing(rank=0, sync_device=None)  # unchanged settings are fine
    with pytest.raises(RuntimeError, match='already synced'):
        training_stats.init_multiprocessing(rank=1, sync_device=torch.device('cpu'))


_WORKER = r'''
import json, os, sys
import torch
from torch_utils import distributed as dist
from torch_utils import training_stats

dist.init()
rank = dist.get_rank()
values = {0: [1.0, 2.0, float('nan')], 1: [4.0, 8.0, 16.0, float('inf')]}[rank]
training_stats.report('Multi/values', torch.tensor(values))
training_stats.report0('Multi/rank0', [100.0 + rank])
training_stats.report('Multi/rank', float(rank))
collector = training_stats.Collector(regex='Multi/.*')
collector.update()
result = dict(rank=rank, world=dist.get_world_size(), stats=collector.as_dict(), names=collector.names())

training_stats.report('Mismatch/only-rank%d' % rank, 1.0)
try:
    training_stats.Collector(regex='Mismatch/.*').update()
    result['mismatch'] = 'no error'
except ValueError as err:
    result['mismatch'] = 'ValueError'
with open(os.path.join(sys.argv[1], 'rank%d.json' % rank), 'w') as f:
    json.dump(result, f)
'''


@pytest.mark.slow
def test_reduction_across_two_gloo_ranks(tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(_WORKER)
    run_script(script, tmp_path, launcher=torchrun())

    values = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    for rank in range(2):
        result = json.loads((tmp_path / f'rank{rank}.json').read_text())
        assert result['rank'] == rank and result['world'] == 2
        assert result['names'] == ['Multi/values', 'Multi/rank0', 'Multi/rank']
        stats = result['stats']
        assert stats['Multi/values']['num'] == 5
        assert stats['Multi/values']['mean'] == pytest.approx(values.mean())
        assert stats['Multi/values']['std'] == pytest.approx(values.std())
        assert stats['Multi/rank0'] == dict(num=1, mean=100.0, std=0.0)
        assert stats['Multi/rank']['mean'] == pytest.approx(0.5)
        assert result['mismatch'] == 'ValueError'
