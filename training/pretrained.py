"""Pretrained networks that a training method builds on: a distillation teacher, a network to start
from (--init), a guide. Loading (once per process, with the file's SHA-256 so that a resumed run can
tell whether the file changed), checking against the run's data and encoder, rebuilding the
architecture as our Precond, and copying the weights into a trainable network."""

import hashlib
import os

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence
from training import networks_edm2

#----------------------------------------------------------------------------

class PretrainedError(dnnlib.UserError):
    """A pretrained network that cannot be used for this run."""


_loaded = dict()  # (local path, mtime, size) -> EasyDict(net, encoder, sha256)


def _sha256(path):
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()


def _load_once(source, option):
    path = dnnlib.util.open_url(source, return_filename=True, verbose=(dist.get_rank() == 0))
    if not os.path.isfile(path):
        persistence.load_network_pickle(path, what=option)  # says what is wrong with the path
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    if key not in _loaded:
        data = persistence.load_network_pickle(path, what=option)  # a one-line error for unusable files
        net = rebuilt_as_precond(data.get('ema', data.get('net')).eval().requires_grad_(False))
        _loaded[key] = dnnlib.EasyDict(net=net, encoder=data.get('encoder'), sha256=_sha256(path))
    return _loaded[key]


def load(source, option='--teacher', argument=None):
    """EasyDict(net, encoder, sha256) of the network pickle `source` (path or URL): its 'ema' network
    (or 'net'), frozen in eval mode, its encoder (or None) and the file's SHA-256. The first process
    of each node reads (or downloads) it first; a process loads a file once. Errors name the
    command-line `option` in their text and the constructor `argument` in their `option` field."""
    try:
        return dist.node_first(_load_once, source, option)
    except OSError as err:
        raise PretrainedError(f'{option}: cannot read {source} ({err})', option=argument) from None
    except dnnlib.UserError as err:
        err.option = err.option or argument
        raise


def load_pinned(source, sha256, option, argument, sha256_argument, purpose):
    """load(), refusing a file whose SHA-256 is not `sha256` (None: any file) with a message that says
    what the run uses it for (`purpose`, e.g. 'distils')."""
    loaded = load(source, option=option, argument=argument)
    if sha256 is not None and loaded.sha256 != sha256:
        raise PretrainedError(f'{option}: {source} is not the file this run {purpose}: its SHA-256 is '
            f'{loaded.sha256}, the run was started with {sha256}', option=sha256_argument)
    return loaded


def network_kwargs(net, role='teacher'):
    """Constructor keywords that rebuild `net`'s architecture as our Precond (without the interface
    sizes, which the training loop derives from the data)."""
    kwargs = net.init_kwargs if hasattr(net, 'init_kwargs') else None
    if kwargs is None:
        raise PretrainedError(f'the {role} ({type(net).__name__}) does not record its constructor arguments; '
            'expected an EDM2 Precond from a network pickle')
    for key in ('img_resolution', 'img_channels', 'label_dim'):
        kwargs.pop(key, None)
    return dnnlib.EasyDict(class_name='training.networks_edm2.Precond', **kwargs)


def rebuilt_as_precond(net, tolerance=1e-5):
    """A frozen copy of `net` built from this repository's Precond (the pickle's own classes come from the
    source embedded in it, e.g. EDM2's), so that our frozen-network shortcuts apply to it; returned only if
    every weight fits and both give the same outputs on a probe batch, otherwise `net` itself."""
    if isinstance(net, networks_edm2.Precond):
        return net
    try:
        kwargs = dict(network_kwargs(net))
        del kwargs['class_name']
        own = networks_edm2.Precond(**kwargs, img_resolution=net.img_resolution, img_channels=net.img_channels,
            label_dim=net.label_dim)
        copy_weights(own, net)
    except (PretrainedError, AttributeError, TypeError):
        return net
    own.eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn([2, net.img_channels, net.img_resolution, net.img_resolution], generator=generator)
    labels = torch.eye(net.label_dim)[[0, net.label_dim - 1]] if net.label_dim else None
    with torch.no_grad():
        expected, got = (model(x, torch.tensor([0.5, 5.0]), labels) for model in (net, own))
    return own if torch.allclose(got, expected, rtol=tolerance, atol=tolerance) else net


def _encoder_signature(encoder):
    fields = {name: np.asarray(getattr(encoder, name)) for name in ('vae_name', 'scale', 'bias') if hasattr(encoder, name)}
    return type(encoder).__name__, fields


def check_against_data(net, net_encoder, encoder, latent_shape, label_dim, role='teacher', option='--teacher',
        argument=None):
    """Raise one PretrainedError listing every way `net` does not fit the run's data and encoder.
    `label_dim` None skips the label check (e.g. for an unconditional guide)."""
    problems = []
    channels, resolution = latent_shape[1], latent_shape[-1]
    if net.img_resolution != resolution:
        problems.append(f'resolution: {role} {net.img_resolution}, data {resolution}')
    if net.img_channels != channels:
        problems.append(f'channels: {role} {net.img_channels}, data (after the encoder) {channels}')
    if label_dim is not None and net.label_dim != label_dim:
        problems.append(f'label dimension: {role} {net.label_dim}, data {label_dim} (see --cond)')
    if net_encoder is not None:
        (net_kind, net_fields), (run_kind, run_fields) = _encoder_signature(net_encoder), _encoder_signature(encoder)
        if net_kind != run_kind:
            problems.append(f'encoder: {role} {net_kind}, run {run_kind}')
        else:
            for name in net_fields.keys() | run_fields.keys():
                a, b = net_fields.get(name), run_fields.get(name)
                same = a is not None and b is not None and a.shape == b.shape and (
                    np.array_equal(a, b) if a.dtype.kind in 'US' else np.allclose(a, b))
                if not same:
                    problems.append(f'encoder {name}: {role} {a}, run {b}')
    if problems:
        raise PretrainedError(f'{option}: the {role} does not match the training data: ' + '; '.join(problems),
            option=argument)


def copy_weights(dst, src, role='teacher'):
    """Copy every parameter and buffer of `src` into `dst`, after checking that all names and shapes
    agree (a half-copied network is never left behind)."""
    source = dict(misc.named_params_and_buffers(src))
    target = dict(misc.named_params_and_buffers(dst))
    missing = sorted(target.keys() - source.keys())
    extra = sorted(source.keys() - target.keys())
    mismatched = [f'{name} {tuple(source[name].shape)} vs {tuple(tensor.shape)}'
        for name, tensor in target.items() if name in source and source[name].shape != tensor.shape]
    if missing or extra or mismatched:
        raise PretrainedError(f'cannot copy the {role} into the network: missing in the {role} {missing[:5]}, '
            f'not in the network {extra[:5]}, shape mismatches {mismatched[:5]}')
    with torch.no_grad():
        for name, tensor in target.items():
            tensor.copy_(source[name])


def freeze_parameters(net, prefixes):
    """Exclude the parameters whose names start with any of `prefixes` from training."""
    for prefix in prefixes:
        matched = [param for name, param in net.named_parameters() if name.startswith(prefix)]
        if not matched:
            raise ValueError(f'no parameter name of {type(net).__name__} starts with {prefix!r}')
        for param in matched:
            param.requires_grad_(False)

#----------------------------------------------------------------------------
# Guidance (docs/algorithm.md §8.6).

def guided_denoise(net, gnet, guidance, x, sigma, class_labels=None, dtype=torch.float32):
    """The guided denoiser D_w = D_g + w (D - D_g) = lerp(D_g, D, w) of network `net` (D) and guide
    `gnet` (D_g), both outputs cast to `dtype`: classifier-free guidance (Ho & Salimans 2022) with an
    unconditional guide, autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version
    of itself") with a smaller or less trained one. With w = 1 it is D, and the guide is not evaluated."""
    denoised = net(x, sigma, class_labels).to(dtype)
    if guidance == 1:
        return denoised
    return torch.lerp(gnet(x, sigma, class_labels).to(dtype), denoised, guidance)


def load_starting_network(init_pkl, init_sha256, encoder, latent_shape, label_dim):
    """The --init network of a training method (ct, sct): loaded, pinned by content and checked against the data."""
    init = load_pinned(init_pkl, init_sha256, '--init', 'init_pkl', 'init_sha256', 'started from')
    check_against_data(init.net, init.encoder, encoder, latent_shape, label_dim,
        role='starting network', option='--init', argument='init_pkl')
    return init


class GuidedDenoiser(torch.nn.Module):
    """guided_denoise() of two frozen networks as one float32 denoiser module D_w(x; sigma, class_labels),
    with the interface sizes (img_resolution, img_channels, label_dim) of the main network `net`, so that
    it samples like `net` (None where `net` has no such attribute)."""

    def __init__(self, net, gnet, guidance):
        super().__init__()
        self.net, self.gnet, self.guidance = net, gnet, float(guidance)
        self.img_resolution, self.img_channels, self.label_dim = (getattr(net, name, None)
            for name in ('img_resolution', 'img_channels', 'label_dim'))

    def forward(self, x, sigma, class_labels=None):
        return guided_denoise(self.net, self.gnet, self.guidance, x, sigma, class_labels)

#----------------------------------------------------------------------------
