"""Fréchet distances (FID, FD_DINOv2) between image sets, and the reference statistics they need."""

import os
import pickle

import click
import numpy as np
import scipy.linalg
import torch
import tqdm

import dnnlib
import generate_images
from torch_utils import distributed as dist

#----------------------------------------------------------------------------
# Feature detectors, one per metric. Each takes a uint8 NCHW RGB batch and returns [N, D] features.
# `source` overrides where the detector comes from (a local file for offline machines).

class DetectorUnavailable(RuntimeError):
    """A detector could not be fetched or built."""


def _offline_hint(metric, source, err):
    return (f'Could not load the {metric} detector from {source} ({type(err).__name__}: {err}). '
            f'On a machine without internet access, copy that file from a connected machine and pass '
            f'--detector={metric}=/path/to/local/file')


def _load_pickled_model(metric, source, verbose):
    try:
        f = dnnlib.util.open_url(source, verbose=verbose)
    except Exception as err:
        raise DetectorUnavailable(_offline_hint(metric, source, err)) from err
    with f:
        return pickle.load(f)


class InceptionDetector:
    """InceptionV3 pool features (2048-D); the pickled model resizes and normalises internally."""
    default_source = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'

    def __init__(self, source=None, verbose=True):
        self.model = _load_pickled_model('fid', source or self.default_source, verbose)

    def __call__(self, images):
        return self.model.to(images.device)(images, return_features=True)


class DINOv2Detector:
    """DINOv2 ViT-L/14 class-token embedding (1024-D) of 224x224 ImageNet-normalised images.

    `source` is a torch.hub GitHub repo ('owner/name:ref'), a local hub checkout directory, or a
    pickled model (path or URL).
    """
    default_source = 'facebookresearch/dinov2:main'
    image_mean = (0.485, 0.456, 0.406)
    image_std = (0.229, 0.224, 0.225)

    def __init__(self, source=None, verbose=True):
        source = source or self.default_source
        if os.path.isfile(source) or '://' in source:
            self.model = _load_pickled_model('fd_dinov2', source, verbose)
        else:
            self.model = self._load_from_hub(source, verbose)
        self.model.eval().requires_grad_(False)

    @staticmethod
    def _load_from_hub(source, verbose):
        torch.hub.set_dir(dnnlib.make_cache_dir_path('torch_hub'))
        where = 'local' if os.path.isdir(source) else 'github'
        try:
            return torch.hub.load(source, 'dinov2_vitl14', source=where, trust_repo=True, verbose=verbose, skip_validation=True)
        except Exception as err:
            raise DetectorUnavailable(_offline_hint('fd_dinov2', f'torch.hub repo {source}', err)) from err

    def __call__(self, images):
        x = torch.nn.functional.interpolate(images.to(torch.float32), size=(224, 224), mode='bicubic', antialias=True)
        mean = torch.tensor(self.image_mean, device=x.device).reshape(1, -1, 1, 1)
        std = torch.tensor(self.image_std, device=x.device).reshape(1, -1, 1, 1)
        return self.model.to(x.device)((x / 255 - mean) / std)


DETECTORS = {'fid': InceptionDetector, 'fd_dinov2': DINOv2Detector}

_detector_cache = {}


def get_detector(metric, source=None, verbose=True):
    """Build (once per process) the detector for a metric; rank 0 goes first so that downloads happen once."""
    if metric not in DETECTORS:
        raise ValueError(f'Unknown metric "{metric}"; expected one of {sorted(DETECTORS)}')
    key = (metric, source)
    if key not in _detector_cache:
        if dist.get_rank() != 0:
            generate_images.barrier_if_distributed()
        _detector_cache[key] = DETECTORS[metric](source, verbose=(verbose and dist.get_rank() == 0))
        if dist.get_rank() == 0:
            generate_images.barrier_if_distributed()
    return _detector_cache[key]

#----------------------------------------------------------------------------
# Feature statistics.

class FeatureMoments:
    """Running count, sum and sum of outer products of feature vectors, in float64."""

    def __init__(self):
        self.count = 0
        self.total = None
        self.outer = None

    def add(self, features):
        f = features.to(torch.float64).flatten(1)
        if self.total is None:
            self._allocate(f.shape[1], f.device)
        self.count += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f

    def _allocate(self, dim, device):
        self.total = torch.zeros([dim], dtype=torch.float64, device=device)
        self.outer = torch.zeros([dim, dim], dtype=torch.float64, device=device)

    def all_reduce(self, device):
        if dist.get_world_size() == 1:
            return
        dim = torch.tensor([0 if self.total is None else self.total.numel()], device=device)
        torch.distributed.all_reduce(dim, op=torch.distributed.ReduceOp.MAX)
        if self.total is None:
            self._allocate(int(dim), device)
        count = torch.tensor([self.count], dtype=torch.float64, device=device)
        for tensor in (count, self.total, self.outer):
            torch.distributed.all_reduce(tensor)
        self.count = int(count)

    def mean_and_cov(self):
        """Mean and unbiased covariance."""
        if self.count < 2:
            raise ValueError(f'Feature statistics need at least 2 images, got {self.count}')
        n = self.count
        mu = self.total / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def compute_stats(image_batches, metrics, detector_sources=None, device=None, verbose=True):
    """Feature statistics of all images on all ranks: {'num_images': N, metric: {'mu': [D], 'sigma': [D, D]}}."""
    device = torch.device(device) if device is not None else generate_images.default_device()
    detector_sources = detector_sources or {}
    detectors = {metric: get_detector(metric, detector_sources.get(metric), verbose) for metric in metrics}
    moments = {metric: FeatureMoments() for metric in metrics}
    for images in image_batches:
        images = torch.as_tensor(images).to(device)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)  # the detectors expect RGB
        with torch.no_grad():
            for metric in metrics:
                moments[metric].add(detectors[metric](images))
    stats = {}
    for metric in metrics:
        moments[metric].all_reduce(device)
        mu, sigma = moments[metric].mean_and_cov()
        stats[metric] = dict(mu=mu, sigma=sigma)
    return {'num_images': moments[metrics[0]].count, **stats}


def load_stats(path, verbose=True):
    """Reference statistics: an EDM2 pickle (path or URL), or an EDM1 .npz holding Inception 'mu'/'sigma'."""
    with dnnlib.util.open_url(path, verbose=verbose) as f:
        if path.lower().endswith('.npz'):
            arrays = np.load(f)
            return {'fid': dict(mu=arrays['mu'], sigma=arrays['sigma'])}
        return pickle.load(f)


def frechet_distance(mu, sigma, mu_ref, sigma_ref):
    """|mu - mu_ref|^2 + tr(sigma + sigma_ref - 2 (sigma sigma_ref)^(1/2))."""
    mean_term = np.square(mu - mu_ref).sum()
    cross_root = scipy.linalg.sqrtm(np.dot(sigma, sigma_ref))
    return float(np.real(mean_term + np.trace(sigma + sigma_ref - 2 * cross_root)))


def calculate_metrics_from_stats(stats, ref, metrics, verbose=True):
    """Fréchet distance per metric present in both; others are skipped with a message."""
    results = {}
    for metric in metrics:
        if metric not in stats or metric not in ref:
            if verbose:
                side = 'the reference' if metric in stats else 'the computed statistics'
                print(f'{metric}: skipped, not in {side}')
            continue
        results[metric] = frechet_distance(stats[metric]['mu'], stats[metric]['sigma'], ref[metric]['mu'], ref[metric]['sigma'])
        if verbose:
            print(f'{metric} = {results[metric]:g}')
    return results

#----------------------------------------------------------------------------
# Image sources.

def dataset_batches(path, num=None, seed=0, max_batch_size=64, num_workers=2, verbose=True):
    """uint8 NCHW batches of this rank's share of an image folder/ZIP; `num` picks a seeded random subset."""
    from training.dataset import ImageFolderDataset
    dataset = ImageFolderDataset(path=path, max_size=num, random_seed=seed)
    if num is not None and len(dataset) < num:
        raise click.ClickException(f'{path} holds {len(dataset)} images, fewer than --num={num}')
    chunks = [chunk for chunk in generate_images.rank_batches(len(dataset), max_batch_size) if len(chunk) > 0]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=chunks, num_workers=num_workers,
                                         prefetch_factor=(2 if num_workers > 0 else None))
    for images, _labels in tqdm.tqdm(loader, unit='batch', disable=not (verbose and dist.get_rank() == 0)):
        yield images


def generated_batches(net, num, seed=0, max_batch_size=32, verbose=True):
    """Images for seeds seed .. seed+num-1, sampled as generate_images.py would (students use their own sampler)."""
    for r in generate_images.generate_images(net=net, seeds=range(seed, seed + num), max_batch_size=max_batch_size, verbose=verbose):
        yield r.images

#----------------------------------------------------------------------------
# Command line.

def parse_metrics(ctx, param, text):
    metrics = [name.strip() for name in text.split(',') if name.strip()]
    unknown = [name for name in metrics if name not in DETECTORS]
    if unknown or not metrics:
        raise click.BadParameter(f'{unknown or text!r}: expected a comma-separated list from {sorted(DETECTORS)}')
    return metrics


def parse_detector_sources(ctx, param, values):
    sources = {}
    for text in values:
        metric, sep, source = text.partition('=')
        if not sep or metric not in DETECTORS or not source:
            raise click.BadParameter(f'"{text}": expected METRIC=PATH_OR_URL with METRIC one of {sorted(DETECTORS)}')
        sources[metric] = source
    return sources


def _rank0_load_ref(ref_path):
    if dist.get_rank() != 0:
        return None
    print(f'Loading reference statistics from {ref_path} ...')
    return load_stats(ref_path)


def _run(fn):
    try:
        return fn()
    except (DetectorUnavailable, generate_images.GenerationError) as err:
        raise click.ClickException(str(err)) from err


metrics_option = click.option('--metrics', help='Comma-separated metrics', metavar='LIST', default='fid,fd_dinov2', show_default=True, callback=parse_metrics)
detector_option = click.option('--detector', 'detector_sources', help='Local file or URL for a metric\'s detector, e.g. fid=inception-2015-12-05.pkl (repeatable)', metavar='METRIC=PATH', multiple=True, callback=parse_detector_sources)


@click.group()
def cli():
    """Compute FID and FD_DINOv2 against reference statistics.

    \b
    Examples:
    # Reference statistics of a dataset
    python calculate_metrics.py ref --data=datasets/img512.zip --dest=refs/img512.pkl
    \b
    # Metrics of 50k PNGs
    python calculate_metrics.py calc --images=out --ref=refs/img512.pkl
    \b
    # Metrics of a network (a consistency student uses its S-step sampler), 8 processes
    torchrun --standalone --nproc_per_node=8 calculate_metrics.py gen --net=student.pkl --ref=refs/img512.pkl
    \b
    # Offline: give the detector files explicitly
    python calculate_metrics.py calc --images=out --ref=refs/img512.pkl --metrics=fid --detector=fid=/data/inception-2015-12-05.pkl
    """


@cli.command()
@click.option('--images', 'image_path', help='Image folder or ZIP', metavar='PATH|ZIP', required=True)
@click.option('--ref', 'ref_path', help='Reference statistics', metavar='PKL|NPZ|URL', required=True)
@metrics_option
@click.option('--num', help='Number of images to use', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Seed for choosing the subset', metavar='INT', type=int, default=0, show_default=True)
@click.option('--batch', 'max_batch_size', help='Largest batch per process', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers', 'num_workers', help='DataLoader worker processes', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@detector_option
def calc(image_path, ref_path, metrics, num, seed, max_batch_size, num_workers, detector_sources):
    """Metrics of a folder of images."""
    torch.multiprocessing.set_start_method('spawn')
    dist.init()
    ref = _run(lambda: _rank0_load_ref(ref_path))
    dist.print0(f'Computing features of {num} images from {image_path} ...')
    batches = dataset_batches(image_path, num=num, seed=seed, max_batch_size=max_batch_size, num_workers=num_workers)
    stats = _run(lambda: compute_stats(batches, metrics, detector_sources))
    if dist.get_rank() == 0:
        calculate_metrics_from_stats(stats, ref, metrics)


@cli.command()
@click.option('--net', help='Network pickle', metavar='PKL|URL', required=True)
@click.option('--ref', 'ref_path', help='Reference statistics', metavar='PKL|NPZ|URL', required=True)
@metrics_option
@click.option('--num', help='Number of images to generate', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='First seed', metavar='INT', type=int, default=0, show_default=True)
@click.option('--batch', 'max_batch_size', help='Largest batch per process', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@detector_option
def gen(net, ref_path, metrics, num, seed, max_batch_size, detector_sources):
    """Metrics of images generated on the fly (nothing is saved)."""
    dist.init()
    ref = _run(lambda: _rank0_load_ref(ref_path))
    dist.print0(f'Generating {num} images with {net} ...')
    batches = generated_batches(net, num=num, seed=seed, max_batch_size=max_batch_size)
    stats = _run(lambda: compute_stats(batches, metrics, detector_sources))
    if dist.get_rank() == 0:
        calculate_metrics_from_stats(stats, ref, metrics)


@cli.command()
@click.option('--data', 'data_path', help='Image folder or ZIP', metavar='PATH|ZIP', required=True)
@click.option('--dest', help='Output statistics pickle', metavar='PKL', required=True)
@metrics_option
@click.option('--batch', 'max_batch_size', help='Largest batch per process', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers', 'num_workers', help='DataLoader worker processes', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@detector_option
def ref(data_path, dest, metrics, max_batch_size, num_workers, detector_sources):
    """Reference statistics of all images in a dataset."""
    torch.multiprocessing.set_start_method('spawn')
    dist.init()
    dist.print0(f'Computing features of all images in {data_path} ...')
    batches = dataset_batches(data_path, max_batch_size=max_batch_size, num_workers=num_workers)
    stats = _run(lambda: compute_stats(batches, metrics, detector_sources))
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        with open(dest, 'wb') as f:
            pickle.dump(stats, f)
        print(f'Saved statistics of {stats["num_images"]} images to {dest}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    cli()
