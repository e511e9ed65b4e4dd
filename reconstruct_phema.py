"""Build networks with any power-function EMA length from the phema snapshots of a training run."""

import copy
import math
import os
import pickle
import re

import click
import numpy as np
import torch
import tqdm

import dnnlib
import training.phema
from torch_utils import distributed as dist
from torch_utils import persistence

_SNAPSHOT_NAME = re.compile(r'(.*)-(\d+)-(\d+\.\d+)\.pkl')


def kimg_to_nimg(kimg):
    """Training time of a snapshot named after `kimg`; snapshot times are multiples of 1024 images."""
    nimg = (kimg * 1000 + 999) // 1024 * 1024
    if nimg // 1000 != kimg:
        raise ValueError(f'kimg {kimg} does not correspond to a multiple of 1024 images')
    return nimg


def parse_std_list(text):
    """Parse '0.05,0.1' or a range such as '0.010,0.015,...,0.250' into a sorted list of unique stds."""
    tokens = [token.strip() for token in text.split(',') if token.strip()]
    if not tokens:
        raise ValueError(f'no EMA stds in "{text}"')
    if '...' in (tokens[0], tokens[-1]):
        raise ValueError(f'"..." needs two values before it and one after it in "{text}"')
    values = []
    for pos, token in enumerate(tokens):
        if token == '...':
            continue
        try:
            value = float(token)
        except ValueError:
            raise ValueError(f'"{token}" in "{text}" is not a number') from None
        if not math.isfinite(value):
            raise ValueError(f'"{token}" in "{text}" is not a finite number')
        if pos > 0 and tokens[pos - 1] == '...':
            values += _expand_range(values, value, text)
        else:
            values.append(value)
    stds = sorted(set(round(value, 9) for value in values))  # rounding merges float noise from ranges
    for std in stds:
        if not 0 < std < 0.289:
            raise ValueError(f'EMA std {std} in "{text}" is outside (0, 0.289)')
    return stds


def _expand_range(values, stop, text):
    if len(values) < 2:
        raise ValueError(f'"..." needs two values before it and one after it in "{text}"')
    start, step = values[-1], values[-1] - values[-2]
    num_steps = round((stop - start) / step) if step != 0 else 0
    if num_steps < 1 or abs(start + num_steps * step - stop) > 1e-6 * abs(step):
        raise ValueError(f'range {values[-2]},{start},...,{stop} in "{text}" does not reach its end in whole steps')
    return np.linspace(start, stop, num_steps + 1)[1:].tolist()


def find_snapshots(indir, prefix=None, stds=None):
    """Phema snapshots '<prefix>-<kimg>-<std>.pkl' directly inside `indir`, sorted by (nimg, std)."""
    try:
        file_names = os.listdir(indir)
    except OSError as err:
        raise dnnlib.UserError(f'--indir: cannot list {indir} ({err.strerror or err})') from None
    snapshots = []
    for file_name in file_names:
        match = _SNAPSHOT_NAME.fullmatch(file_name)
        if match is None:
            continue
        file_prefix, kimg, std = match.group(1), int(match.group(2)), float(match.group(3))
        if (prefix is not None and file_prefix != prefix) or (stds is not None and std not in stds):
            continue
        try:
            nimg = kimg_to_nimg(kimg)
        except ValueError as err:
            raise ValueError(f'Snapshot {file_name}: {err}') from err
        snapshots.append(dnnlib.EasyDict(path=os.path.join(indir, file_name), nimg=nimg, std=std))
    return sorted(snapshots, key=lambda snapshot: (snapshot.nimg, snapshot.std))


def _load_snapshot(path):
    data = persistence.load_network_pickle(path, what='--indir snapshot')
    if 'ema' not in data:
        raise dnnlib.UserError(f'--indir snapshot: {path} has no "ema" network (keys: {sorted(map(str, data))})')
    data['ema'] = data['ema'].to(torch.float32)
    return data


@torch.no_grad()
def _accumulate(dst, src, coef, src_path):
    dst_params, src_params = list(dst.parameters()), list(src.parameters())
    shapes_match = len(dst_params) == len(src_params) and all(p.shape == q.shape for p, q in zip(dst_params, src_params))
    if not shapes_match:
        raise ValueError(f'Snapshot {src_path} has different network parameters than the first snapshot')
    for dst_param, src_param in zip(dst_params, src_params):
        dst_param.add_(src_param, alpha=coef)
    for dst_buf, src_buf in zip(dst.buffers(), src.buffers()):
        dst_buf.copy_(src_buf)


def reconstruct_phema(snapshots, out_stds, out_nimg, outdir, outprefix='phema', batch_size=8, skip_existing=False, verbose=True):
    """Write one network pickle per std in `out_stds`, each the EMA profile at time `out_nimg`.

    Output pickles keep every entry of the first input snapshot; only 'ema' is replaced. Each
    group of up to `batch_size` outputs is built in a single pass over the inputs. `outdir` is created
    and written only after the first pass has read every input, so an unreadable snapshot (a
    dnnlib.UserError) leaves no output behind; each output file appears complete or not at all.
    """
    inputs = [snapshot for snapshot in snapshots if 0 < snapshot.nimg <= out_nimg]
    if not inputs:
        raise ValueError(f'No input snapshots with 0 < nimg <= {out_nimg}')

    def out_path(std):
        return os.path.join(outdir, f'{outprefix}-{out_nimg // 1000:07d}-{std:.3f}.pkl')

    out_stds = sorted(set(out_stds))
    if skip_existing:
        out_stds = [std for std in out_stds if not os.path.isfile(out_path(std))]
    if not out_stds:
        return
    groups = np.array_split(out_stds, int(np.ceil(len(out_stds) / batch_size)))

    in_nimg = [snapshot.nimg for snapshot in inputs]
    in_std = [snapshot.std for snapshot in inputs]
    with tqdm.tqdm(total=len(groups) * len(inputs), unit='step', disable=not verbose) as progress:
        for group in groups:
            coefs = training.phema.solve_posthoc_coefficients(in_nimg, in_std, out_nimg, group)
            outputs = None
            for snapshot, snapshot_coefs in zip(inputs, coefs):
                data = _load_snapshot(snapshot.path)
                if outputs is None:
                    template = copy.deepcopy(data)
                    for param in template['ema'].parameters():
                        param.detach().zero_()
                    outputs = [copy.deepcopy(template) for _std in group]
                for output, coef in zip(outputs, snapshot_coefs):
                    _accumulate(output['ema'], data['ema'], float(coef), snapshot.path)
                progress.update(1)
            os.makedirs(outdir, exist_ok=True)
            for output, std in zip(outputs, group):
                output['ema'] = output['ema'].to(torch.float16)
                dist.write_file_atomically(out_path(std), lambda f: pickle.dump(output, f))


class StdList(click.ParamType):
    name = 'LIST'

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return parse_std_list(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


@click.command()
@click.option('--indir', help='Folder holding the phema snapshots of one run', metavar='DIR', type=str, required=True)
@click.option('--inprefix', help='Use only snapshots whose name starts with this prefix', metavar='STR', type=str, default=None)
@click.option('--instd', help='Use only snapshots with these stds', metavar='LIST', type=StdList(), default=None)
@click.option('--outdir', help='Folder for the reconstructed pickles', metavar='DIR', type=str, required=True)
@click.option('--outprefix', help='File name prefix of the reconstructed pickles', metavar='STR', type=str, default='phema', show_default=True)
@click.option('--outstd', help='Stds to reconstruct, e.g. 0.05,0.1 or 0.010,0.015,...,0.250', metavar='LIST', type=StdList(), required=True)
@click.option('--outkimg', help='Training time of the reconstruction  [default: latest snapshot]', metavar='KIMG', type=click.IntRange(min=1), default=None)
@click.option('--skip', help='Leave out stds whose output file already exists', is_flag=True)
@click.option('--batch', help='How many stds to build per pass over the snapshots', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
def cmdline(indir, inprefix, instd, outdir, outprefix, outstd, outkimg, skip, batch):
    """Reconstruct power-function EMA networks of any length from the snapshots of a training run.

    Example: python reconstruct_phema.py --indir=run-dir --outdir=out --outstd=0.030,0.080 --outkimg=8388
    """
    if os.environ.get('WORLD_SIZE', '1') != '1':
        raise click.ClickException('reconstruct_phema.py runs as a single process; do not launch it with torchrun')
    if not os.path.isdir(indir):
        raise click.ClickException(f'--indir: {indir} ' + ('is not a directory' if os.path.exists(indir) else 'does not exist'))
    try:
        snapshots = find_snapshots(indir, prefix=inprefix, stds=instd)
        if not snapshots:
            if find_snapshots(indir):
                raise ValueError(f'--indir: no snapshots in {indir} pass the --inprefix/--instd filters')
            raise ValueError(f'--indir: {indir} holds no snapshots named <prefix>-<kimg>-<std>.pkl')
        out_nimg = max(snapshot.nimg for snapshot in snapshots)
        if outkimg is not None:
            at_outkimg = [snapshot.nimg for snapshot in snapshots if snapshot.nimg // 1000 == outkimg]
            if not at_outkimg:
                raise ValueError(f'--outkimg {outkimg}: no input snapshot was taken at that time')
            out_nimg = at_outkimg[0]
        print(f'Reconstructing {len(outstd)} EMA profile(s) at kimg {out_nimg // 1000} from {indir} into {outdir}')
        reconstruct_phema(snapshots, out_stds=outstd, out_nimg=out_nimg, outdir=outdir, outprefix=outprefix,
                          batch_size=batch, skip_existing=skip)
    except ValueError as err:  # the bad requests and inputs found here, dnnlib.UserErrors included
        raise click.ClickException(str(err)) from None
    print('Done.')


if __name__ == '__main__':
    cmdline()
