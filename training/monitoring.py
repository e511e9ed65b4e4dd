"""Watching quality while a run trains: validation of network snapshots against reference statistics.

At every `every`-th network snapshot, the Validator samples the snapshot as generate_images.py would
(a consistency student with its own S-step sampler, a diffusion model with Heun), computes feature
statistics as calculate_metrics.py does (over all ranks) and the Fréchet distances to the reference,
and appends one JSON row per metric to run_dir/metrics-val.jsonl. Once per run it also evaluates the
baselines that the training method names (e.g. the teacher with its own samplers), so that every run
directory holds its own student-vs-teacher table. The best value of each metric is kept as a hard
link (or copy) of its snapshot, network-snapshot-best-<metric>.pkl. docs/monitoring.md has the details.
"""

import inspect
import json
import os
import shutil
import time
import uuid

import numpy as np
import torch

import calculate_metrics
import dnnlib
import generate_images
from torch_utils import distributed as dist
from torch_utils import training_stats

#----------------------------------------------------------------------------

VALIDATION_FILE = 'metrics-val.jsonl'
HEUN_STEPS = inspect.signature(generate_images.edm_sampler).parameters['num_steps'].default  # EDM2's 32


def sampler_nfe(sampler, steps):
    """Network evaluations of `steps` sampler steps: Heun's last step is a single Euler step."""
    return 2 * steps - 1 if sampler == 'heun' else steps


def _link_or_copy(src, dst):
    """Make `dst` the same file as `src` (a hard link where the filesystem allows it), atomically."""
    tmp = os.path.join(os.path.dirname(dst), f'.{os.path.basename(dst)}.{uuid.uuid4().hex}.tmp')
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class Validator:
    """Validation during training; built by training_loop() from `validation_kwargs`.

    ref:        reference statistics (calculate_metrics.py ref), path or URL.
    metrics:    metrics to compute (default: every metric in the reference file).
    every:      validate every `every`-th network snapshot.
    num:        images per evaluation (seeds seed .. seed + num - 1, split over all ranks).
    steps:      sampler steps (default: S for consistency students, 32 Heun steps for diffusion models).
    batch:      largest sampling batch per process.
    at_start:   also validate the snapshot written at the start of a fresh run.
    heun:       also evaluate the method's teacher with Heun (EDM2's 32 steps) as a baseline, once.
    std:        EMA profile to evaluate (default: the last of the run's profiles, e.g. 0.100).
    detectors:  {metric: local file or URL} for the detectors (offline use, custom detectors).
    """

    def __init__(self, run_dir, ref, metrics=None, every=1, num=50000, steps=None, seed=0, batch=32, at_start=False,
            heun=True, std=None, detectors=None, verbose=True):
        self.run_dir, self.path = run_dir, os.path.join(run_dir, VALIDATION_FILE)
        self.ref = dist.node_first(calculate_metrics.load_stats, ref, verbose=False, what='--val_ref')
        available = [name for name in self.ref if name != 'num_images']
        self.metrics = list(metrics) if metrics else available
        missing = [metric for metric in self.metrics if metric not in available]
        if missing:
            raise dnnlib.UserError(f'--val_ref: {ref} has no statistics for {missing}; it holds {available}',
                option='metrics')
        if every < 1 or num < 2 or batch < 1 or (steps is not None and steps < 1):
            raise dnnlib.UserError(f'validation needs every >= 1, num >= 2, batch >= 1 and steps >= 1; got every={every}, '
                f'num={num}, batch={batch}, steps={steps}')
        self.every, self.num, self.steps, self.seed, self.batch = every, num, steps, seed, batch
        self.at_start, self.heun, self.std = at_start, heun, std
        self.detectors, self.verbose = dict(detectors or {}), verbose
        for metric in self.metrics:  # fail now, not at the first validation
            calculate_metrics.get_detector(metric, verbose=False, source=self.detectors.get(metric))
        self.best = {}
        self.have_baselines = False
        self.grid = None       # uint8 NCHW images of the last evaluation (rank 0), e.g. for W&B
        self.last_rows = []    # the rows written by the last validate() (rank 0)

    #------------------------------------------------------------------------

    def start(self, cur_nimg, resumed):
        """Continue metrics-val.jsonl from where this session starts: rows after it (from an interrupted
        session) are dropped, and the best values and baselines are taken from the rows kept."""
        rows = []
        if os.path.isfile(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass  # a row cut short by a kill
        kept = [row for row in rows if resumed and row['nimg'] <= cur_nimg]
        self.have_baselines = any(row['network'] != 'trained' for row in kept)
        for row in kept:
            if row['network'] == 'trained' and row['value'] < self.best.get(row['metric'], (np.inf,))[0]:
                self.best[row['metric']] = (row['value'], row['snapshot'])
        dist.barrier()  # every rank has read the rows before rank 0 rewrites them
        if dist.get_rank() == 0 and len(kept) != len(rows):
            dist.write_file_atomically(self.path, lambda f: f.write(''.join(json.dumps(row) + '\n' for row in kept).encode()))
            for metric, (_value, snapshot) in self.best.items():
                if os.path.isfile(os.path.join(self.run_dir, snapshot)):
                    _link_or_copy(os.path.join(self.run_dir, snapshot), self._best_path(metric))

    def due(self, cur_nimg, snapshot_nimg, fresh_start):
        """Whether the snapshot written at cur_nimg is to be validated."""
        if fresh_start:
            return self.at_start
        return (cur_nimg // snapshot_nimg) % self.every == 0

    def choose_snapshot(self, snapshots):
        """The snapshot of the EMA profile `std` (default: the last one) among [(suffix, data, file name)]."""
        if self.std is None:
            return snapshots[-1]
        for snapshot in snapshots:
            if snapshot[0] == f'-{self.std:.3f}':
                return snapshot
        raise dnnlib.UserError(f'--val_std={self.std}: the run has no such EMA profile; it has '
            f'{[suffix.lstrip("-") for suffix, _data, _file in snapshots]}', option='std')

    def validate(self, cur_nimg, snapshots, loss_fn):
        """Evaluate one of the snapshots [(suffix, data, file name)] just written (see choose_snapshot)
        and, once per run, the method's baselines; returns the seconds spent."""
        start = time.time()
        self.last_rows = []
        suffix, data, snapshot_file = self.choose_snapshot(snapshots)
        ema_std = float(suffix.lstrip('-')) if suffix else None
        if not self.have_baselines:
            for baseline in (loss_fn.validation_baselines(heun=self.heun) if hasattr(loss_fn, 'validation_baselines') else []):
                self._evaluate(cur_nimg, baseline.network, baseline.data, None, None, baseline.sampler,
                    baseline.sampler_kwargs)
            self.have_baselines = True
        sampler = data['cd'].get('sampler', 'euler') if 'cd' in data else 'heun'  # a student's own sampler
        steps = self.steps or (int(data['cd']['S']) if 'cd' in data else HEUN_STEPS)
        results = self._evaluate(cur_nimg, 'trained', data, snapshot_file, ema_std, sampler, dict(num_steps=steps),
            keep_grid=True)
        seconds = time.time() - start
        for metric in self.metrics:
            training_stats.report0(f'Val/{metric}', results.get(metric, []))
        training_stats.report0('Timing/val_sec', seconds)
        return seconds

    def _best_path(self, metric):
        return os.path.join(self.run_dir, f'network-snapshot-best-{metric}.pkl')

    def _evaluate(self, cur_nimg, network, data, snapshot_file, ema_std, sampler, sampler_kwargs, keep_grid=False):
        start = time.time()
        sampler_kwargs = dict(dict(num_steps=HEUN_STEPS) if sampler == 'heun' else {}, **sampler_kwargs)
        seeds = range(self.seed, self.seed + self.num)
        batches = generate_images.generate_images(net=data, seeds=seeds, max_batch_size=self.batch, verbose=False,
            sampler_fn=sampler, **sampler_kwargs)
        if keep_grid:
            batches = self._keeping_grid(batches)
        stats = None
        for r in calculate_metrics.calculate_stats_for_iterable(batches, metrics=self.metrics, verbose=False,
                detector_sources=self.detectors):
            stats = r.stats if r.stats is not None else stats
        results = {}
        if dist.get_rank() == 0:
            results = calculate_metrics.calculate_metrics_from_stats(stats, self.ref, self.metrics, verbose=False)
            self._record(cur_nimg, network, snapshot_file, ema_std, sampler, sampler_kwargs['num_steps'], results,
                time.time() - start)
        return results

    def _keeping_grid(self, batches):
        self.grid = None
        for r in batches:
            if r.images is not None and self.grid is None:
                self.grid = r.images[:64].cpu()
            yield r

    def _record(self, cur_nimg, network, snapshot_file, ema_std, sampler, steps, results, seconds):
        rows = []
        for metric, value in results.items():
            row = dict(kimg=cur_nimg / 1e3, nimg=cur_nimg, network=network, snapshot=snapshot_file, metric=metric,
                value=value, sampler=sampler, steps=steps, nfe=sampler_nfe(sampler, steps), ema_std=ema_std,
                images=self.num, seconds=round(seconds, 3), best=False)
            if network == 'trained' and value < self.best.get(metric, (np.inf,))[0]:
                self.best[metric] = (value, snapshot_file)
                row['best'] = True
                _link_or_copy(os.path.join(self.run_dir, snapshot_file), self._best_path(metric))
            rows.append(row)
            if self.verbose:
                label = 'Validation' if network == 'trained' else f'Baseline ({network})'
                print(f'{label}: {metric} {value:.4g} ({sampler}, {steps} steps = {sampler_nfe(sampler, steps)} NFE, '
                    f'{self.num} images, {seconds:.1f} s){" - best so far" if row["best"] else ""}')
        with open(self.path, 'at') as f:
            f.write(''.join(json.dumps(row) + '\n' for row in rows))
        self.last_rows += rows

#----------------------------------------------------------------------------
