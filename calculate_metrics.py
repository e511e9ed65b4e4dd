"""Fréchet distances (FID, FD_DINOv2) between image sets, and the reference statistics they need.

Besides the two standard metrics, any metric named fd_<name> (e.g. fd_digits) is the Fréchet distance in
the feature space of a network of your own: give it as --detector=fd_<name>=PATH, a pickle of a torch
module that maps uint8 NCHW RGB images to [N, D] features (a persistent class, as in the network
pickles, carries its own source; see training/digit_features.py).
"""

import os
import pickle
import re

import click
import numpy as np
import PIL.Image
import scipy.linalg
import torch
import tqdm

import dnnlib
import dnnlib.cli
import generate_images
from torch_utils import distributed as dist
from torch_utils import misc

#----------------------------------------------------------------------------
# Feature detectors, one per metric. Each takes a uint8 NCHW RGB batch and returns [N, feature_dim] features.
# `source` replaces where the standard model comes from (e.g. a local copy, for offline machines).

class DetectorUnavailable(dnnlib.UserError):
    """A detector could not be fetched or built."""


class MetricsError(dnnlib.UserError):
    """Reference statistics, image sets or statistics that cannot be used as given."""


def _offline_hint(metric, source, err):
    return (f'Could not load the {metric} detector from {source} ({type(err).__name__}: {err}). '
            f'On a machine without internet access, copy that file from a connected machine and pass '
            f'--detector={metric}=/path/to/local/file')


def _one_line(err):
    """'Type: message' of an exception, its message's line breaks (the unpickler has some) made spaces."""
    return f'{type(err).__name__}: {" ".join(str(err).split())}'


def _load_pickled_model(metric, source):
    try:
        f = dnnlib.util.open_url(source, verbose=False)
    except Exception as err:
        if '://' not in source:  # a local file: advice about offline machines would not help
            raise DetectorUnavailable(f'Could not load the {metric} detector from {source} ({_one_line(err)})') from None
        raise DetectorUnavailable(_offline_hint(metric, source, err)) from err
    with f:
        try:
            model = pickle.load(f)
        except EOFError:
            raise DetectorUnavailable(f'The {metric} detector file {source} is empty or truncated') from None
        except Exception as err:  # the unpickler fails in many ways on bytes that are not a pickle
            raise DetectorUnavailable(f'The {metric} detector file {source} is not a readable pickle '
                f'({_one_line(err)})') from None
    if not (callable(model) and callable(getattr(model, 'to', None))):
        raise DetectorUnavailable(f'The {metric} detector file {source} holds a {type(model).__name__}, '
            'not a torch module')
    return model


class Detector:
    """Base class: maps a uint8 NCHW RGB batch to [N, feature_dim] features.

    `feature_dim` is the standard model's; the statistics take the size of the features they get.
    """

    def __init__(self, feature_dim):
        self.feature_dim = feature_dim

    def __call__(self, images):
        raise NotImplementedError(f'{type(self).__name__} must implement __call__')


class InceptionV3Detector(Detector):
    """InceptionV3 pool features (2048-D); the pickled model resizes and normalises internally."""
    default_source = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'

    def __init__(self, source=None):
        super().__init__(feature_dim=2048)
        self.model = _load_pickled_model('fid', source or self.default_source)

    def __call__(self, images):
        return self.model.to(images.device)(images, return_features=True)


# The facebookresearch/dinov2 commit whose hub code is loaded (newest on main as of 2025-08-14), not whatever main is now.
DINOV2_COMMIT = 'b8931f7bf91576930313be2c6d6af376033b35f0'


class DINOv2Detector(Detector):
    """DINOv2 ViT-L/14 class-token embedding (1024-D) of 224x224 ImageNet-normalised images.

    `resize_mode` 'torch' resizes with torch's antialiased bicubic filter on the device; 'pil' uses
    PIL's bicubic filter on the CPU, as the original FD_DINOv2 code (dgm-eval) does (slower, nearly
    the same features). `source` is a torch.hub GitHub repo ('owner/name:ref'), a local hub checkout
    directory, or a pickled model (path or URL).
    """
    default_source = f'facebookresearch/dinov2:{DINOV2_COMMIT}'
    image_mean = (0.485, 0.456, 0.406)
    image_std = (0.229, 0.224, 0.225)

    def __init__(self, resize_mode='torch', source=None):
        super().__init__(feature_dim=1024)
        if resize_mode not in ('torch', 'pil'):
            raise ValueError(f'resize_mode must be "torch" or "pil", not {resize_mode!r}')
        self.resize_mode = resize_mode
        source = source or self.default_source
        if os.path.isfile(source) or '://' in source:
            self.model = _load_pickled_model('fd_dinov2', source)
        else:
            self.model = self._load_from_hub(source)
        self.model.eval().requires_grad_(False)

    @staticmethod
    def _load_from_hub(source):
        torch.hub.set_dir(dnnlib.make_cache_dir_path('torch_hub'))
        where = 'local' if os.path.isdir(source) else 'github'
        # torch.hub's validation accepts only refs that are the head of a branch or tag, so a pinned commit
        # needs skip_validation=True; a full 40-hex hash cannot be swapped for a fork's code anyway.
        try:
            return torch.hub.load(source, 'dinov2_vitl14', source=where, trust_repo=True, verbose=False, skip_validation=True)
        except Exception as err:
            raise DetectorUnavailable(_offline_hint('fd_dinov2', f'torch.hub repo {source}', err)) from err

    def _resize(self, images):
        if self.resize_mode == 'torch':
            return torch.nn.functional.interpolate(images.to(torch.float32), size=(224, 224), mode='bicubic', antialias=True)
        pixels = images.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        resized = [np.asarray(PIL.Image.fromarray(p).resize((224, 224), PIL.Image.Resampling.BICUBIC)) for p in pixels]
        return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).to(images.device, torch.float32)

    def __call__(self, images):
        x = self._resize(images)
        mean = torch.tensor(self.image_mean, device=x.device).reshape(1, -1, 1, 1)
        std = torch.tensor(self.image_std, device=x.device).reshape(1, -1, 1, 1)
        return self.model.to(x.device)((x / 255 - mean) / std)


class FeatureNetworkDetector(Detector):
    """The features of a network of your own, for a metric fd_<name>.

    `source` (path or URL) is a pickle of a torch module that takes a uint8 NCHW RGB batch and returns
    [N, D] features; it is loaded like the Inception pickle. `feature_dim` is the module's own
    `feature_dim` attribute if it has one, else None (the statistics take the size of the features).
    """

    def __init__(self, source, metric='fd_custom'):
        self.metric = metric
        self.model = _load_pickled_model(metric, source)
        super().__init__(feature_dim=getattr(self.model, 'feature_dim', None))
        if isinstance(self.model, torch.nn.Module):
            self.model.eval().requires_grad_(False)

    def __call__(self, images):
        features = self.model.to(images.device)(images)
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != images.shape[0]:
            found = f'shape {list(features.shape)}' if isinstance(features, torch.Tensor) else f'a {type(features).__name__}'
            raise MetricsError(f'The {self.metric} detector returned {found} for {images.shape[0]} images; '
                'expected [N, D] features, one row per image')
        return features


# Metric name -> dnnlib.util.construct_class_by_name() arguments of its detector. Metrics fd_<name> that
# are not listed here use FeatureNetworkDetector with the file given as their source (custom_metric_spec).
metric_specs = {metric: dnnlib.EasyDict(detector_kwargs=dnnlib.EasyDict(class_name=detector_class))
                for metric, detector_class in [('fid', InceptionV3Detector), ('fd_dinov2', DINOv2Detector)]}

CUSTOM_METRIC_PATTERN = re.compile(r'fd_[A-Za-z0-9][A-Za-z0-9_]*')
CUSTOM_METRIC_HELP = 'fd_<name> (a feature network of your own, given with --detector=fd_<name>=PATH)'


def is_custom_metric(metric):
    """True for names fd_<name> other than the standard metrics: Fréchet distances of a given feature network."""
    return isinstance(metric, str) and metric not in metric_specs and CUSTOM_METRIC_PATTERN.fullmatch(metric) is not None


def is_known_metric(metric):
    return metric in metric_specs or is_custom_metric(metric)


def custom_metric_spec(metric, source):
    """The metric_specs-style entry of a custom metric fd_<name>, whose detector is the network pickle `source`."""
    if source is None:
        raise DetectorUnavailable(f'{metric} is not a built-in metric: give its feature network with '
            f'--detector={metric}=PATH (a pickle of a torch module that maps uint8 NCHW RGB images to [N, D] features)')
    return dnnlib.EasyDict(detector_kwargs=dnnlib.EasyDict(class_name=FeatureNetworkDetector, metric=metric, source=source))


def check_detector_sources(metrics, detector_sources):
    """Raise a DetectorUnavailable for the first custom metric in `metrics` that has no detector source."""
    for metric in metrics:
        if is_custom_metric(metric):
            custom_metric_spec(metric, (detector_sources or {}).get(metric))


_detector_cache = {}


def get_detector(metric, verbose=True, source=None):
    """The detector of a metric, built once per process (first on each node, so that downloads happen once).

    A metric fd_<name> that metric_specs does not list needs `source`: the pickle of its feature network.
    """
    if not is_known_metric(metric):
        raise ValueError(f'Unknown metric "{metric}"; expected one of {sorted(metric_specs)} or {CUSTOM_METRIC_HELP}')
    key = (metric, source)
    if key not in _detector_cache:
        if is_custom_metric(metric):
            kwargs = dnnlib.EasyDict(custom_metric_spec(metric, source).detector_kwargs)
        else:
            kwargs = dnnlib.EasyDict(metric_specs[metric].detector_kwargs)
        if source is not None:
            kwargs.source = source
        if verbose:
            dist.print0(f'Setting up the {metric} detector ...')
        _detector_cache[key] = dist.node_first(dnnlib.util.construct_class_by_name, **kwargs)
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


def _with_last_flag(iterable):
    """(item, is_last) pairs, one item ahead, so that the end is known without len()."""
    iterator = iter(iterable)
    for item in iterator:
        for following in iterator:
            yield item, False
            item = following
        yield item, True


def _batch_images(batch, device):
    """The uint8 NCHW images of a batch given as images, an (images, labels) pair or a dict; None if empty."""
    if isinstance(batch, dict):
        batch = batch['images']
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        batch = batch[0]
    return None if batch is None else torch.as_tensor(batch).to(device)


def _sum_over_ranks(count, device):
    if dist.get_world_size() == 1:
        return count
    total = torch.tensor([count], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(total)
    return int(total)


def calculate_stats_for_iterable(image_iter, metrics=['fid', 'fd_dinov2'], verbose=True, dest_path=None, device=None,
                                 detector_sources=None):
    """Feature statistics of the image batches of all ranks, computed while the result is iterated.

    Returns a BatchIterable yielding, per batch, EasyDict(stats, images, batch_idx, num_batches,
    num_images): num_images counts the images of all ranks so far, and stats is None except for the
    last batch, where it is {'num_images': N, metric: {'mu': [D], 'sigma': [D, D]}} (float64), also
    saved to `dest_path` by rank 0 unless that is None. A batch is uint8 NCHW images (1-channel
    images are used as RGB), an (images, labels) pair or a dict with 'images'; None counts as empty.
    Every rank must give the same number of batches. `detector_sources` maps metrics to
    get_detector() sources; `device` None picks CUDA when available, else the CPU.
    """
    device = torch.device(device) if device is not None else misc.default_device()
    detector_sources = detector_sources or {}
    detectors = {metric: get_detector(metric, verbose=verbose, source=detector_sources.get(metric)) for metric in metrics}
    num_batches = len(image_iter) if hasattr(image_iter, '__len__') else None
    if verbose:
        dist.print0(f'Computing feature statistics for {", ".join(metrics)} ...')

    def results():
        moments = {metric: FeatureMoments() for metric in metrics}
        count = 0
        for batch_idx, (batch, is_last) in enumerate(_with_last_flag(image_iter)):
            images = _batch_images(batch, device)
            if images is not None:
                rgb = images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images
                with torch.no_grad():
                    for metric in metrics:
                        moments[metric].add(detectors[metric](rgb))
                count += images.shape[0]
            r = dnnlib.EasyDict(stats=None, images=images, batch_idx=batch_idx, num_batches=num_batches,
                                num_images=_sum_over_ranks(count, device))
            if is_last:
                r.stats = dict(num_images=r.num_images)
                for metric in metrics:
                    moments[metric].all_reduce(device)
                    mu, sigma = moments[metric].mean_and_cov()
                    r.stats[metric] = dict(mu=mu, sigma=sigma)
                if dest_path is not None and dist.get_rank() == 0:
                    save_stats(r.stats, dest_path, verbose=False)
            yield r

    return generate_images.BatchIterable(num_batches, results)


def calculate_stats_for_files(image_path, num_images=None, seed=0, max_batch_size=64, num_workers=2, prefetch_factor=2,
                              verbose=True, **stats_kwargs):
    """calculate_stats_for_iterable() of the images in a folder or ZIP, split across ranks.

    `num_images` None uses every image, a number a random subset of that size chosen by `seed`.
    `stats_kwargs` go to calculate_stats_for_iterable() (metrics, dest_path, device, ...). A folder
    that is missing, holds no images or holds one that cannot be read raises a DatasetError (a
    dnnlib.UserError) with a one-line message, also when the image is read by a DataLoader worker.
    """
    from training.dataset import ImageFolderDataset
    if verbose:
        dist.print0(f'Reading the image list of {image_path} ...')
    dataset = ImageFolderDataset(path=image_path, max_size=num_images, random_seed=seed)
    if num_images is not None and len(dataset) < num_images:
        raise MetricsError(f'{image_path} holds {len(dataset)} images, fewer than the {num_images} asked for')
    if len(dataset) < 2:
        raise MetricsError(f'{image_path} holds {len(dataset)} images; statistics need at least 2')
    chunks = generate_images.rank_batches(len(dataset), max_batch_size)
    filled = [chunk for chunk in chunks if len(chunk) > 0]
    loader = torch.utils.data.DataLoader(_ReadFailuresAsValues(dataset), batch_sampler=filled, num_workers=num_workers,
                                         collate_fn=_collate_or_failure,
                                         prefetch_factor=(prefetch_factor if num_workers > 0 else None))

    def loaded_batches():
        for batch in loader:
            if isinstance(batch, _ReadFailure):
                raise batch.error
            yield batch
        # A DataLoader cannot give an empty batch; a rank's empty chunks are its last ones and go on as None.
        yield from [None] * (len(chunks) - len(filled))

    batches = generate_images.BatchIterable(len(chunks), loaded_batches)
    return calculate_stats_for_iterable(batches, verbose=verbose, **stats_kwargs)


class _ReadFailure:
    """What a DataLoader worker hands back for a sample it cannot read: the dataset's own error, which the
    main process raises. (Raised in the worker, it would arrive wrapped in the worker's traceback.)"""

    def __init__(self, error):
        self.error = error


class _ReadFailuresAsValues(torch.utils.data.Dataset):
    """A dataset whose unreadable samples come back as _ReadFailure values instead of raising."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        try:
            return self.dataset[idx]
        except dnnlib.UserError as err:  # training.dataset.DatasetError
            return _ReadFailure(err)


def _collate_or_failure(items):
    failures = [item for item in items if isinstance(item, _ReadFailure)]
    return failures[0] if failures else torch.utils.data.default_collate(items)


def load_stats(path, verbose=True, what='reference statistics'):
    """Reference statistics: an EDM2 pickle (path or URL), or an EDM1 .npz holding Inception 'mu'/'sigma'.

    A file that is missing or unreadable, or that holds no usable statistics (a [D] 'mu' and a [D, D]
    'sigma', finite, for at least one metric) raises a MetricsError whose message starts with `what`.
    """
    if verbose:
        dist.print0(f'Loading reference statistics from {path} ...')
    path = os.fspath(path)
    is_npz = path.lower().endswith('.npz')
    try:
        with dnnlib.util.open_url(path, verbose=verbose) as f:
            if is_npz:
                archive = np.load(f, allow_pickle=False)
                if not hasattr(archive, 'files'):
                    raise MetricsError(f'{what}: {path} holds a single array, not an .npz archive of "mu" and "sigma"')
                with archive:
                    stats = {name: archive[name] for name in archive.files}
            else:
                stats = pickle.load(f)
    except MetricsError:
        raise
    except FileNotFoundError:
        raise MetricsError(f'{what}: {path} does not exist') from None
    except IsADirectoryError:
        raise MetricsError(f'{what}: {path} is a directory, not a statistics file') from None
    except EOFError:
        raise MetricsError(f'{what}: {path} is empty or truncated') from None
    except Exception as err:  # bytes that are no pickle or .npz fail in many ways
        raise MetricsError(f'{what}: {path} is not a readable {".npz" if is_npz else "pickle"} file '
            f'({_one_line(err)})') from None
    if is_npz:
        missing = [name for name in ('mu', 'sigma') if name not in stats]
        if missing:
            raise MetricsError(f'{what}: {path} has no {" and ".join(missing)} array; an .npz reference holds '
                f'the Inception "mu" and "sigma" (found {sorted(stats)})')
        stats = {'fid': dict(mu=stats['mu'], sigma=stats['sigma'])}
    return _checked_stats(stats, path, what)


def _checked_stats(stats, path, what):
    """`stats` if it holds usable statistics of at least one metric, else a MetricsError."""
    if not isinstance(stats, dict):
        raise MetricsError(f'{what}: {path} is not a statistics file; expected a dict of metrics, found a '
            f'{type(stats).__name__}')
    found = [metric for metric in metric_specs if metric in stats] + [key for key in stats if is_custom_metric(key)]
    if not found:
        raise MetricsError(f'{what}: {path} holds no statistics of {" or ".join(sorted(metric_specs))} '
            f'(nor of a metric fd_<name>; its keys: {sorted(map(str, stats))})')
    for metric in found:
        entry = stats[metric]
        if not isinstance(entry, dict) or 'mu' not in entry or 'sigma' not in entry:
            raise MetricsError(f'{what}: {path}: the {metric} entry is not a dict with "mu" and "sigma"')
        try:
            mu, sigma = np.asarray(entry['mu'], dtype=np.float64), np.asarray(entry['sigma'], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise MetricsError(f'{what}: {path}: the {metric} statistics are not numeric arrays ({_one_line(err)})') from None
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise MetricsError(f'{what}: {path}: the {metric} statistics have shapes mu {list(mu.shape)} and sigma '
                f'{list(sigma.shape)}; expected [D] and [D, D]')
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise MetricsError(f'{what}: {path}: the {metric} statistics hold NaN or inf')
    return stats


def save_stats(stats, path, verbose=True):
    """Write statistics as a plain pickle, atomically; missing folders are created."""
    if verbose:
        dist.print0(f'Writing statistics to {path} ...')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    dist.write_file_atomically(path, lambda f: pickle.dump(stats, f))


def frechet_distance(mu, sigma, mu_ref, sigma_ref):
    """|mu - mu_ref|^2 + tr(sigma + sigma_ref - 2 (sigma sigma_ref)^(1/2))."""
    mean_term = np.square(mu - mu_ref).sum()
    cross_root = scipy.linalg.sqrtm(np.dot(sigma, sigma_ref))
    return float(np.real(mean_term + np.trace(sigma + sigma_ref - 2 * cross_root)))


def calculate_metrics_from_stats(stats, ref, metrics=['fid', 'fd_dinov2'], verbose=True):
    """Fréchet distance per metric present in both `stats` and `ref` (statistics, or a path or URL to load
    them from); others are skipped with a message."""
    if isinstance(ref, (str, os.PathLike)):
        ref = load_stats(str(ref), verbose=verbose)
    results = {}
    for metric in metrics:
        if metric not in stats or metric not in ref:
            if verbose:
                side = 'the reference' if metric in stats else 'the computed statistics'
                print(f'{metric}: skipped, not in {side}')
            continue
        dims = np.shape(stats[metric]['mu']), np.shape(ref[metric]['mu'])
        if dims[0] != dims[1]:
            raise MetricsError(f'{metric}: the features have {dims[0][0] if dims[0] else "?"} dimensions but the reference '
                f'statistics {dims[1][0] if dims[1] else "?"}; were they made with another detector?')
        results[metric] = frechet_distance(stats[metric]['mu'], stats[metric]['sigma'], ref[metric]['mu'], ref[metric]['sigma'])
        if verbose:
            print(f'{metric} = {results[metric]:g}')
    return results

#----------------------------------------------------------------------------
# Command line.

def parse_metric_list(s):
    """'fid,fd_dinov2' -> ['fid', 'fd_dinov2']; a list passes through. Names fd_<name> are custom metrics."""
    metrics = s if isinstance(s, list) else [name.strip() for name in s.split(',') if name.strip()]
    unknown = [name for name in metrics if not is_known_metric(name)]
    if unknown or not metrics:
        raise click.BadParameter(f'{unknown or s!r}: expected a comma-separated list from {sorted(metric_specs)} '
            f'and {CUSTOM_METRIC_HELP}')
    return metrics


def parse_detector_sources(ctx, param, values):
    """('fid=inception.pkl', 'fd_digits=digits.pkl', ...) -> {metric: source}; a custom metric fd_<name>
    gets its feature network here."""
    sources = {}
    for text in values:
        metric, sep, source = text.partition('=')
        if not sep or not is_known_metric(metric) or not source:
            raise click.BadParameter(f'"{text}": expected METRIC=PATH_OR_URL with METRIC one of {sorted(metric_specs)} '
                f'or fd_<name> for a feature network of your own')
        sources[metric] = source
    return sources


def _final_stats(stats_iter):
    """Run a calculate_stats_*() result to its end, with a progress bar on rank 0."""
    for r in tqdm.tqdm(stats_iter, unit='batch', disable=dist.get_rank() != 0):
        pass
    return r.stats


def _rank0_load_stats(ref_path):
    return load_stats(ref_path, what='--ref') if dist.get_rank() == 0 else None  # before the long part, so that a bad path fails fast


metrics_option = click.option('--metrics', help='Comma-separated metrics', metavar='LIST', type=parse_metric_list, default='fid,fd_dinov2', show_default=True)
detector_option = click.option('--detector', 'detector_sources', help='Local file or URL for a metric\'s detector, e.g. fid=inception-2015-12-05.pkl, or the feature network of a metric fd_<name>, e.g. fd_digits=digit-features.pkl (repeatable)', metavar='METRIC=PATH', multiple=True, callback=parse_detector_sources)


@click.group()
def cmdline():
    """Compute FID and FD_DINOv2 (or FD_<name> with a feature network of your own) against reference statistics.

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
    \b
    # A metric of your own feature network (a pickled torch module: uint8 NCHW RGB images -> [N, D] features)
    python calculate_metrics.py ref --data=datasets/digits.zip --dest=refs/digits.pkl --metrics=fd_digits --detector=fd_digits=digit-features.pkl
    """


@cmdline.command()
@click.option('--images', 'image_path', help='Image folder or ZIP', metavar='PATH|ZIP', required=True)
@click.option('--ref', 'ref_path', help='Reference statistics', metavar='PKL|NPZ|URL', required=True)
@metrics_option
@click.option('--num', 'num_images', help='Number of images to use', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Seed for choosing the subset', metavar='INT', type=int, default=0, show_default=True)
@click.option('--batch', 'max_batch_size', help='Largest batch per process', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers', 'num_workers', help='DataLoader worker processes', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@detector_option
def calc(image_path, ref_path, metrics, num_images, seed, max_batch_size, num_workers, detector_sources):
    """Metrics of a folder of images."""
    torch.multiprocessing.set_start_method('spawn')
    dist.init()
    with dnnlib.cli.user_errors():
        check_detector_sources(metrics, detector_sources)
        ref = _rank0_load_stats(ref_path)
        stats = _final_stats(calculate_stats_for_files(
            image_path, num_images=num_images, seed=seed, max_batch_size=max_batch_size, num_workers=num_workers,
            metrics=metrics, detector_sources=detector_sources))
        if dist.get_rank() == 0:
            calculate_metrics_from_stats(stats, ref, metrics)


@cmdline.command()
@click.option('--net', help='Network pickle', metavar='PKL|URL', required=True)
@click.option('--ref', 'ref_path', help='Reference statistics', metavar='PKL|NPZ|URL', required=True)
@metrics_option
@click.option('--num', 'num_images', help='Number of images to generate', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='First seed', metavar='INT', type=int, default=0, show_default=True)
@click.option('--batch', 'max_batch_size', help='Largest batch per process', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@detector_option
def gen(net, ref_path, metrics, num_images, seed, max_batch_size, detector_sources):
    """Metrics of images generated on the fly (nothing is saved)."""
    dist.init()
    with dnnlib.cli.user_errors():
        check_detector_sources(metrics, detector_sources)
        ref = _rank0_load_stats(ref_path)
        stats = _final_stats(calculate_stats_for_iterable(
            generate_images.generate_images(net=net, seeds=range(seed, seed + num_images), max_batch_size=max_batch_size),
            metrics=metrics, detector_sources=detector_sources))
        if dist.get_rank() == 0:
            calculate_metrics_from_stats(stats, ref, metrics)


@cmdline.command()
@click.option('--data', 'image_path', help='Image folder or ZIP', metavar='PATH|ZIP', required=True)
@click.option('--dest', 'dest_path', help='Output statistics pickle', metavar='PKL', required=True)
@metrics_option
@click.option('--batch', 'max_batch_size', help='Largest batch per process', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers', 'num_workers', help='DataLoader worker processes', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@detector_option
def ref(image_path, dest_path, metrics, max_batch_size, num_workers, detector_sources):
    """Reference statistics of all images in a dataset."""
    torch.multiprocessing.set_start_method('spawn')
    dist.init()
    with dnnlib.cli.user_errors():
        check_detector_sources(metrics, detector_sources)
        stats = _final_stats(calculate_stats_for_files(
            image_path, max_batch_size=max_batch_size, num_workers=num_workers, metrics=metrics,
            detector_sources=detector_sources, dest_path=dest_path))
    dist.print0(f'Saved statistics of {stats["num_images"]} images to {dest_path}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    cmdline()
