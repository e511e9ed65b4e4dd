"""Sample images from EDM2 network pickles and from few-step consistency students."""

import inspect
import math
import numbers
import os

import click
import numpy as np
import PIL.Image
import torch
import tqdm

import dnnlib
import dnnlib.cli
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence
from training.consistency_ops import ddim_step_edm, make_edge_grid
from training.encoders import StandardRGBEncoder
from training.pretrained import guided_denoise

#----------------------------------------------------------------------------
# Published EDM2 models: preset name -> (net, guiding net, guidance), file names relative to model_root.
# config_presets holds the same as EasyDicts of generate_images() arguments (net, and gnet and guidance if guided).

model_root = 'https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions'

_PUBLISHED_MODELS = {
    'edm2-img512-xs-fid':              ('edm2-img512-xs-2147483-0.135.pkl',  None, None),
    'edm2-img512-xs-dino':             ('edm2-img512-xs-2147483-0.200.pkl',  None, None),
    'edm2-img512-s-fid':               ('edm2-img512-s-2147483-0.130.pkl',   None, None),
    'edm2-img512-s-dino':              ('edm2-img512-s-2147483-0.190.pkl',   None, None),
    'edm2-img512-m-fid':               ('edm2-img512-m-2147483-0.100.pkl',   None, None),
    'edm2-img512-m-dino':              ('edm2-img512-m-2147483-0.155.pkl',   None, None),
    'edm2-img512-l-fid':               ('edm2-img512-l-1879048-0.085.pkl',   None, None),
    'edm2-img512-l-dino':              ('edm2-img512-l-1879048-0.155.pkl',   None, None),
    'edm2-img512-xl-fid':              ('edm2-img512-xl-1342177-0.085.pkl',  None, None),
    'edm2-img512-xl-dino':             ('edm2-img512-xl-1342177-0.155.pkl',  None, None),
    'edm2-img512-xxl-fid':             ('edm2-img512-xxl-0939524-0.070.pkl', None, None),
    'edm2-img512-xxl-dino':            ('edm2-img512-xxl-0939524-0.150.pkl', None, None),
    'edm2-img64-s-fid':                ('edm2-img64-s-1073741-0.075.pkl',    None, None),
    'edm2-img64-m-fid':                ('edm2-img64-m-2147483-0.060.pkl',    None, None),
    'edm2-img64-l-fid':                ('edm2-img64-l-1073741-0.040.pkl',    None, None),
    'edm2-img64-xl-fid':               ('edm2-img64-xl-0671088-0.040.pkl',   None, None),
    'edm2-img512-xs-guid-fid':         ('edm2-img512-xs-2147483-0.045.pkl',  'edm2-img512-xs-uncond-2147483-0.045.pkl', 1.40),
    'edm2-img512-xs-guid-dino':        ('edm2-img512-xs-2147483-0.150.pkl',  'edm2-img512-xs-uncond-2147483-0.150.pkl', 1.70),
    'edm2-img512-s-guid-fid':          ('edm2-img512-s-2147483-0.025.pkl',   'edm2-img512-xs-uncond-2147483-0.025.pkl', 1.40),
    'edm2-img512-s-guid-dino':         ('edm2-img512-s-2147483-0.085.pkl',   'edm2-img512-xs-uncond-2147483-0.085.pkl', 1.90),
    'edm2-img512-m-guid-fid':          ('edm2-img512-m-2147483-0.030.pkl',   'edm2-img512-xs-uncond-2147483-0.030.pkl', 1.20),
    'edm2-img512-m-guid-dino':         ('edm2-img512-m-2147483-0.015.pkl',   'edm2-img512-xs-uncond-2147483-0.015.pkl', 2.00),
    'edm2-img512-l-guid-fid':          ('edm2-img512-l-1879048-0.015.pkl',   'edm2-img512-xs-uncond-2147483-0.015.pkl', 1.20),
    'edm2-img512-l-guid-dino':         ('edm2-img512-l-1879048-0.035.pkl',   'edm2-img512-xs-uncond-2147483-0.035.pkl', 1.70),
    'edm2-img512-xl-guid-fid':         ('edm2-img512-xl-1342177-0.020.pkl',  'edm2-img512-xs-uncond-2147483-0.020.pkl', 1.20),
    'edm2-img512-xl-guid-dino':        ('edm2-img512-xl-1342177-0.030.pkl',  'edm2-img512-xs-uncond-2147483-0.030.pkl', 1.70),
    'edm2-img512-xxl-guid-fid':        ('edm2-img512-xxl-0939524-0.015.pkl', 'edm2-img512-xs-uncond-2147483-0.015.pkl', 1.20),
    'edm2-img512-xxl-guid-dino':       ('edm2-img512-xxl-0939524-0.015.pkl', 'edm2-img512-xs-uncond-2147483-0.015.pkl', 1.70),
    'edm2-img512-s-autog-fid':         ('edm2-img512-s-2147483-0.070.pkl',   'edm2-img512-xs-0134217-0.125.pkl',        2.10),
    'edm2-img512-s-autog-dino':        ('edm2-img512-s-2147483-0.120.pkl',   'edm2-img512-xs-0134217-0.165.pkl',        2.45),
    'edm2-img512-xxl-autog-fid':       ('edm2-img512-xxl-0939524-0.075.pkl', 'edm2-img512-m-0268435-0.155.pkl',         2.05),
    'edm2-img512-xxl-autog-dino':      ('edm2-img512-xxl-0939524-0.130.pkl', 'edm2-img512-m-0268435-0.205.pkl',         2.30),
    'edm2-img512-s-uncond-autog-fid':  ('edm2-img512-s-uncond-2147483-0.070.pkl', 'edm2-img512-xs-uncond-0134217-0.110.pkl', 2.85),
    'edm2-img512-s-uncond-autog-dino': ('edm2-img512-s-uncond-2147483-0.090.pkl', 'edm2-img512-xs-uncond-0134217-0.125.pkl', 2.90),
    'edm2-img64-s-autog-fid':          ('edm2-img64-s-1073741-0.045.pkl',    'edm2-img64-xs-0134217-0.110.pkl',         1.70),
    'edm2-img64-s-autog-dino':         ('edm2-img64-s-1073741-0.105.pkl',    'edm2-img64-xs-0134217-0.175.pkl',         2.20),
}


def _preset(net_file, gnet_file, guidance):
    preset = dnnlib.EasyDict(net=f'{model_root}/{net_file}')
    if gnet_file is not None:
        preset.update(gnet=f'{model_root}/{gnet_file}', guidance=guidance)
    return preset


config_presets = {name: _preset(*files) for name, files in _PUBLISHED_MODELS.items()}

#----------------------------------------------------------------------------
# Samplers. Each maps pure noise (unit variance) to a latent batch; `net` is a denoiser D(x; sigma).
# Their noise levels are make_edge_grid()'s Karras nodes and 0, built in float64 and cast to `dtype`.

def edm_sampler(net, noise, labels=None, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=80, rho=7,
                guidance=1, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, dtype=torch.float32,
                randn_like=torch.randn_like):
    """Heun's 2nd-order solver of the probability-flow ODE, with optional churn and guidance (EDM Alg. 2)."""
    guide = net if gnet is None else gnet

    def denoise(x, sigma):
        return guided_denoise(net, guide, guidance, x, sigma, labels, dtype=dtype)

    sigmas = make_edge_grid(num_steps, sigma_min, sigma_max, rho).to(dtype=dtype, device=noise.device)
    x_next = noise.to(dtype) * sigmas[0]
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x = x_next
        if S_churn > 0 and S_min <= sigma <= S_max:
            sigma_up = sigma * (1 + min(S_churn / num_steps, math.sqrt(2) - 1))
            x = x + (sigma_up ** 2 - sigma ** 2).sqrt() * S_noise * randn_like(x)
            sigma = sigma_up
        slope = (x - denoise(x, sigma)) / sigma
        x_next = x + (sigma_next - sigma) * slope
        if i < num_steps - 1:
            slope_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma) * (slope + slope_next) / 2
    return x_next


def _student_steps(net, noise, labels, num_steps, sigma_min, sigma_max, rho, dtype, renoise):
    sigmas = make_edge_grid(num_steps, sigma_min, sigma_max, rho).to(dtype=dtype, device=noise.device)
    x = noise.to(dtype) * sigmas[0]
    for i in range(num_steps - 1):
        x = renoise(x, net(x, sigmas[i], labels).to(dtype), sigmas[i], sigmas[i + 1])
    return net(x, sigmas[num_steps - 1], labels).to(dtype)  # the step to sigma = 0 returns the prediction


def consistency_sampler(net, noise, labels=None, num_steps=8, sigma_min=0.002, sigma_max=80, rho=7,
                        dtype=torch.float32, randn_like=torch.randn_like):
    """Multistep consistency sampling: one deterministic DDIM (Euler) step per student segment, NFE = num_steps.

    The step is training's ddim_step_edm; its sigma check is off, as the grid's nodes are all positive and
    checking them would wait for the device at every step.
    """
    def ddim(x, x_hat, sigma, sigma_next):
        return ddim_step_edm(x, x_hat, sigma, sigma_next, check=False)
    return _student_steps(net, noise, labels, num_steps, sigma_min, sigma_max, rho, dtype, ddim)


def stochastic_consistency_sampler(net, noise, labels=None, num_steps=8, sigma_min=0.002, sigma_max=80, rho=7,
                                   dtype=torch.float32, randn_like=torch.randn_like):
    """Consistency Models' multistep sampling (Alg. 1): denoise, then noise afresh to the next node."""
    def fresh_noise(x, x_hat, sigma, sigma_next):
        return x_hat + sigma_next * randn_like(x_hat)
    return _student_steps(net, noise, labels, num_steps, sigma_min, sigma_max, rho, dtype, fresh_noise)


def trigflow_times(num_steps, sigma_max=80, sigma_data=0.5, mid_t=1.1):
    """TrigFlow times of an S-step sCM sampler: t_max = atan(sigma_max / sigma_data), then mid_t (Lu & Song 2024's
    1.1 for two steps) and, for more steps, times evenly spaced from mid_t towards 0 (docs/scm.md §5)."""
    t_max = math.atan(sigma_max / sigma_data)
    if not 0 < mid_t < t_max:
        raise GenerationError(f'The TrigFlow sampler needs 0 < mid_t < t_max = {t_max:.5f}, got mid_t = {mid_t}')
    return [t_max] + [mid_t * (num_steps - 1 - k) / (num_steps - 1) for k in range(num_steps - 1)]


def trigflow_sampler(net, noise, labels=None, num_steps=2, sigma_max=80, sigma_data=0.5, mid_t=1.1,
                     dtype=torch.float32, randn_like=torch.randn_like):
    """sCM's multistep sampler in TrigFlow's coordinates x_t = cos t x_0 + sin t z, z ~ N(0, sigma_data^2 I): from
    x = sigma_data * noise at t_max, predict x_0 with f(x_t, t) = D(x_t / cos t; sigma_data tan t), then noise afresh to
    the next time, x = cos t' x_0 + sin t' sigma_data z. NFE = num_steps."""
    times = trigflow_times(num_steps, sigma_max, sigma_data, mid_t)
    x = noise.to(dtype) * sigma_data
    for i, t in enumerate(times):
        denoised = net(x / math.cos(t), sigma_data * math.tan(t), labels).to(dtype)
        if i == num_steps - 1:
            return denoised
        x = math.cos(times[i + 1]) * denoised + math.sin(times[i + 1]) * sigma_data * randn_like(denoised)


SAMPLERS = {'heun': edm_sampler, 'euler': consistency_sampler, 'stochastic': stochastic_consistency_sampler,
    'trigflow': trigflow_sampler}

#----------------------------------------------------------------------------
# Per-seed randomness.

class StackedRandomGenerator:
    """A batch of independent random streams, one per seed, so that an image depends only on its seed."""

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def _stack(self, draw, size):
        if len(size) == 0 or size[0] != len(self.generators):
            raise ValueError(f'Leading size {tuple(size)[:1]} must equal the number of seeds ({len(self.generators)})')
        return torch.stack([draw(generator, list(size[1:])) for generator in self.generators])

    def randn(self, size, **kwargs):
        return self._stack(lambda g, shape: torch.randn(shape, generator=g, **kwargs), size)

    def randn_like(self, input):
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs):
        return self._stack(lambda g, shape: torch.randint(*args, size=shape, generator=g, **kwargs), size)

#----------------------------------------------------------------------------
# Loading, batching and saving.

class GenerationError(dnnlib.UserError):
    """A network pickle, option or sampling result that cannot be used as requested."""


class BatchIterable:
    """Per-batch results that can be iterated (each time afresh) and know their count, for len() and tqdm."""

    def __init__(self, num_batches, make_iterator):
        self.num_batches = num_batches
        self._make_iterator = make_iterator

    def __len__(self):
        if self.num_batches is None:
            raise TypeError('The number of batches is not known in advance')
        return self.num_batches

    def __iter__(self):
        return self._make_iterator()


def _network_data(net, what, role, verbose):
    """The pickle dict behind `net` (a path, URL or loaded dict), or None for a module."""
    if isinstance(net, dict):
        return net
    if not isinstance(net, (str, os.PathLike)):
        return None
    if verbose:
        dist.print0(f'Loading the {role} from {net} ...')
    return persistence.load_network_pickle(os.fspath(net), what=what, verbose=(verbose and dist.get_rank() == 0))


def _pickled_network(data, what):
    """The network of a pickle dict: 'ema', or else 'net' (the rule of persistence.load_network_pickle)."""
    module = data.get('ema', data.get('net'))
    if module is None:
        raise GenerationError(f'{what}: the given dict has no "ema" (or "net") network; keys: {sorted(map(str, data))}')
    return module


def _refuse_guidance_for_student(cd):
    raise GenerationError(f'--gnet and --guidance are not available for consistency students: the guidance '
        f'(W={cd.get("guidance", 1.0)}) is baked into the student during distillation, so it samples in S steps with '
        'no guide network; for other guidance, distil with train_edm2.py --guide=PKL --guidance=W')


def load_networks(net, gnet, guided, encoder, device, verbose):
    """(net, gnet, initialised encoder, 'cd' entry or None) for generate_images(); consistency students
    refuse a guide and guidance (`guided`)."""
    data = _network_data(net, '--net', 'main network', verbose)
    data = data if data is not None else dict(ema=net)
    if data.get('cd') is not None and (guided or gnet is not None):
        _refuse_guidance_for_student(data['cd'])
    guide = _network_data(gnet, '--gnet', 'guiding network', verbose)
    if encoder is None:
        encoder = data.get('encoder')
    if encoder is None:
        encoder = StandardRGBEncoder()
    encoder.init(device)
    gnet = gnet if guide is None else _pickled_network(guide, '--gnet')
    return _pickled_network(data, '--net'), gnet, encoder, data.get('cd')


def seed_labels(label_dim, rnd, class_idx=None, device='cpu'):
    """One-hot labels [N, label_dim], one class drawn per seed from `rnd` (after the noise), all set to
    `class_idx` if given; None for an unconditional network (label_dim 0)."""
    if label_dim == 0:
        return None
    class_ids = rnd.randint(label_dim, size=[len(rnd.generators)], device=device)
    if class_idx is not None:
        class_ids.fill_(class_idx)
    return torch.eye(label_dim, device=device)[class_ids]


def rank_batches(num_items, max_batch_size):
    """Index chunks handled by this rank; every rank gets the same number of (possibly empty) chunks."""
    world_size = dist.get_world_size()
    num_batches = max(math.ceil(num_items / (max_batch_size * world_size)), 1) * world_size
    return np.array_split(np.arange(num_items), num_batches)[dist.get_rank()::world_size]


def image_path(outdir, seed, subdirs=False):
    if subdirs:
        return os.path.join(outdir, f'{seed // 1000 * 1000:06d}', f'{seed:06d}.png')
    return os.path.join(outdir, f'{seed:06d}.png')


def to_pil(image_chw):
    """uint8 CHW array (1 or 3 channels) -> PIL image."""
    array = np.asarray(image_chw).transpose(1, 2, 0)
    return PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def save_png(image_chw, path):
    """Write a uint8 CHW image to `path` as a PNG that appears complete or not at all (folders are created)."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        dist.write_file_atomically(path, lambda f: to_pil(image_chw).save(f, format='png'))
    except OSError as err:
        raise GenerationError(f'Cannot write {path}: {err.strerror or err}') from None


def refuse_non_finite(latents, seeds, writing=False):
    """Raise a GenerationError naming the seeds whose sampled latents hold NaN or inf (one device sync)."""
    finite = torch.isfinite(latents.reshape(len(seeds), -1)).all(dim=1).cpu()
    if bool(finite.all()):
        return
    bad = [seed for seed, ok in zip(seeds, finite.tolist()) if not ok]
    shown = ', '.join(str(seed) for seed in bad[:5]) + (', ...' if len(bad) > 5 else '')
    consequence = 'no image of this batch was written' if writing else 'the batch was not decoded'
    raise GenerationError(f'The sampler returned NaN or inf for {len(bad)} of the {len(seeds)} seeds of a batch '
        f'(seeds {shown}); {consequence}')


def image_grid(images):
    """uint8 NCHW array -> CHW mosaic, as square as possible, empty cells black."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros([rows * cols, c, h, w], dtype=images.dtype)
    canvas[:n] = images
    return canvas.reshape(rows, cols, c, h, w).transpose(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)


def _accepts(fn, name):
    params = inspect.signature(fn).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def resolve_sampler(sampler_fn, cd, sampler_kwargs):
    """Pick the sampler and its settings; consistency students default to their own S-step grid.

    `sampler_fn` is a function, a name from SAMPLERS, a dotted function name or None (the default).
    """
    kwargs = {key: value for key, value in sampler_kwargs.items() if value is not None}
    student_grid = {}
    if cd is not None:
        # sCM students (sampler 'trigflow') record no EDM grid; other samplers use their own sigma_min and rho.
        trigflow = cd.get('sampler') == 'trigflow'
        keys = ('S', 'sigma_max', 'sigma_data') if trigflow else ('S', 'sigma_min', 'sigma_max', 'rho')
        missing = [key for key in keys if key not in cd]
        if missing:
            raise GenerationError(f'The "cd" entry of the network pickle lacks {missing}')
        unusable = {key: cd[key] for key in keys
                    if not isinstance(cd[key], numbers.Real) or not math.isfinite(cd[key]) or cd[key] <= 0}
        if unusable:
            raise GenerationError(f'The "cd" entry of the network pickle has unusable values {unusable}; '
                f'{", ".join(keys)} must be positive numbers')
        kwargs.pop('guidance', None)  # 1: load_networks() refuses any other for students
        student_grid = dict(num_steps=int(cd['S'])) | {key: cd[key] for key in keys[1:]}
        sampler_fn = sampler_fn or ('trigflow' if trigflow else 'euler')
    sampler_fn = sampler_fn or 'heun'
    if isinstance(sampler_fn, str):
        if sampler_fn in SAMPLERS:
            sampler_fn = SAMPLERS[sampler_fn]
        elif '.' in sampler_fn:
            sampler_fn = dnnlib.util.get_obj_by_name(sampler_fn)
        else:
            raise GenerationError(f'Unknown sampler "{sampler_fn}"; expected one of {sorted(SAMPLERS)} or a dotted function name')
    kwargs = {key: value for key, value in student_grid.items() if _accepts(sampler_fn, key)} | kwargs
    unused = [key for key in kwargs if not _accepts(sampler_fn, key)]
    if unused:
        raise GenerationError(f'Sampler {sampler_fn.__name__} does not take {unused}; guidance and S_* options need the Heun sampler')
    defaults = {p.name: p.default for p in inspect.signature(sampler_fn).parameters.values()}
    low, high = (kwargs.get(key, defaults.get(key)) for key in ('sigma_min', 'sigma_max'))
    if isinstance(low, numbers.Real) and isinstance(high, numbers.Real) and low > high:
        raise GenerationError(f'sigma_min = {low} is above sigma_max = {high}; --sigma_min and --sigma_max replace '
            'the defaults (a student\'s come from its pickle) and must keep sigma_min <= sigma_max')
    return sampler_fn, kwargs

#----------------------------------------------------------------------------

def generate_images(net, gnet=None, encoder=None, outdir=None, subdirs=False, seeds=range(16, 24), class_idx=None,
                    max_batch_size=32, encoder_batch_size=4, verbose=True, device=None, sampler_fn=None,
                    **sampler_kwargs):
    """Generate one image per seed, split across ranks, and save them as PNGs to `outdir` (None: don't).

    Returns a BatchIterable: one EasyDict(images, labels, noise, batch_idx, num_batches, indices, seeds)
    per batch of this rank, with images, labels and noise None for an empty batch. Networks are loaded
    when called, the images are made while iterating.

    `net` and `gnet` are network pickles (path, URL or loaded dict) or denoiser modules; gnet None
    means net. A pickle with a 'cd' entry is a consistency student and is sampled, by default, with
    its own S-step grid; any guidance is built into a student when it is distilled, so it takes
    neither gnet nor guidance. `sampler_fn` is a sampler function, a name from SAMPLERS, a dotted
    function name, or None for Heun (edm_sampler) on EDM2 models and the consistency sampler on students.
    `sampler_kwargs` with value None are left at the sampler's default. `encoder_batch_size` None
    keeps the encoder's own; `device` None picks CUDA when available, else the CPU.

    A batch whose sampled latents hold NaN or inf raises a GenerationError naming its seeds, before
    any of its images is decoded or written.
    """
    device = torch.device(device) if device is not None else misc.default_device()
    guided = sampler_kwargs.get('guidance') not in (None, 1)
    net, gnet, encoder, cd = dist.node_first(load_networks, net, gnet, guided, encoder, device, verbose)
    if encoder_batch_size is not None and hasattr(encoder, 'batch_size'):
        encoder.batch_size = encoder_batch_size
    sampler_fn, sampler_kwargs = resolve_sampler(sampler_fn, cd, sampler_kwargs)
    if class_idx is not None and not 0 <= class_idx < net.label_dim:
        raise GenerationError(f'Class index {class_idx} is out of range for a network with {net.label_dim} classes')
    net.to(device)
    if _accepts(sampler_fn, 'gnet'):
        sampler_kwargs['gnet'] = net if gnet is None else gnet.to(device)

    batches = rank_batches(len(seeds), max_batch_size)
    if verbose:
        dist.print0(f'Generating {len(seeds)} images' + (f' to "{outdir}"' if outdir is not None else '') + ' ...')

    def generate_batch(batch_idx, indices):
        r = dnnlib.EasyDict(images=None, labels=None, noise=None, batch_idx=batch_idx, num_batches=len(batches),
                            indices=indices, seeds=[seeds[i] for i in indices])
        if not r.seeds:
            return r
        rnd = StackedRandomGenerator(device, r.seeds)
        r.noise = rnd.randn([len(r.seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
        r.labels = seed_labels(net.label_dim, rnd, class_idx, device)
        with torch.no_grad():
            latents = sampler_fn(net=net, noise=r.noise, labels=r.labels, randn_like=rnd.randn_like, **sampler_kwargs)
            refuse_non_finite(latents, r.seeds, writing=outdir is not None)
            r.images = encoder.decode(latents)
        if outdir is not None:
            for seed, image in zip(r.seeds, r.images.cpu().numpy()):
                save_png(image, image_path(outdir, seed, subdirs))
        return r

    def results():
        for batch_idx, indices in enumerate(batches):
            r = generate_batch(batch_idx, indices)
            dist.barrier()  # the ranks move through the batches together
            yield r

    return BatchIterable(len(batches), results)

#----------------------------------------------------------------------------
# Command line.

def parse_int_list(s):
    """'1,4-6,9' -> [1, 4, 5, 6, 9] (ranges inclusive); a list passes through."""
    if isinstance(s, list):
        return s
    values = []
    for part in s.split(','):
        bounds = part.strip().split('-')
        if len(bounds) > 2 or not all(b.strip().isdigit() for b in bounds):
            raise click.BadParameter(f'"{part}" in "{s}" is neither an integer nor a range like 4-6')
        low, high = int(bounds[0]), int(bounds[-1])
        if high < low:
            raise click.BadParameter(f'Range "{part}" ends before it starts')
        values.extend(range(low, high + 1))
    return values


def gather_to_rank0(items):
    if dist.get_world_size() == 1:
        return items
    everything = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(everything, items)
    return [item for part in everything for item in part]


@click.command()
@click.option('--preset', help='Published EDM2 configuration (sets --net, --gnet, --guidance)', type=click.Choice(sorted(config_presets)))
@click.option('--net', help='Network pickle to sample (path or URL)', metavar='PKL|URL')
@click.option('--gnet', help='Guiding network pickle (path or URL)', metavar='PKL|URL')
@click.option('--outdir', help='Directory for the PNG files', metavar='DIR', required=True)
@click.option('--subdirs', help='Put every 1000 seeds into their own subdirectory', is_flag=True)
@click.option('--seeds', help='Seeds, e.g. 0-63 or 1,5,7-9', metavar='LIST', type=parse_int_list, default='16-19', show_default=True)
@click.option('--class', 'class_idx', help='Class index for all images [default: random per seed]', metavar='INT', type=click.IntRange(min=0))
@click.option('--batch', 'max_batch_size', help='Largest batch per process', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--grid', help='Also save all images as one mosaic to this PNG file', metavar='FILE.png')
@click.option('--sampler', 'sampler_fn', help='heun (EDM2 models), euler (deterministic consistency), stochastic (consistency with fresh noise), trigflow (sCM students) [default: the student\'s, else heun]', type=click.Choice(sorted(SAMPLERS)))
@click.option('--steps', 'num_steps', help='Number of noise levels [default: S for students, else 32]', metavar='INT', type=click.IntRange(min=1))
@click.option('--sigma_min', help='Lowest noise level [default: 0.002 or the student\'s]', metavar='FLOAT', type=dnnlib.cli.FiniteFloat(min=0, min_open=True))
@click.option('--sigma_max', help='Highest noise level [default: 80 or the student\'s]', metavar='FLOAT', type=dnnlib.cli.FiniteFloat(min=0, min_open=True))
@click.option('--rho', help='Karras schedule exponent [default: 7 or the student\'s]', metavar='FLOAT', type=dnnlib.cli.FiniteFloat(min=0, min_open=True))
@click.option('--mid_t', help='TrigFlow time of the second step (trigflow); more steps spread evenly below it [default: 1.1]', metavar='FLOAT', type=dnnlib.cli.FiniteFloat(min=0, min_open=True))
@click.option('--guidance', help='Guidance strength; 1 disables guidance  [default: 1]', metavar='FLOAT', type=dnnlib.cli.FiniteFloat())
@click.option('--S_churn', 'S_churn', help='Stochasticity strength (Heun) [default: 0]', metavar='FLOAT', type=dnnlib.cli.FiniteFloat(min=0))
@click.option('--S_min', 'S_min', help='Lowest noise level with churn (Heun) [default: 0]', metavar='FLOAT', type=dnnlib.cli.FiniteFloat(min=0))
@click.option('--S_max', 'S_max', help='Highest noise level with churn (Heun) [default: inf]', metavar='FLOAT', type=dnnlib.cli.FiniteFloat(min=0, allow_inf=True))
@click.option('--S_noise', 'S_noise', help='Churn noise scale (Heun) [default: 1]', metavar='FLOAT', type=dnnlib.cli.FiniteFloat(min=0))
def cmdline(preset, net, gnet, outdir, subdirs, seeds, class_idx, max_batch_size, grid, sampler_fn, **sampler_kwargs):
    """Generate images with an EDM2 model or a consistency-distilled student.

    \b
    Examples:
    # Four images from a published EDM2 model
    python generate_images.py --preset=edm2-img512-s-guid-fid --outdir=out --seeds=0-3
    \b
    # A distilled student with its own S-step sampler, 2 processes, plus a mosaic
    # (snapshots are named network-snapshot-<kimg, 7 digits>-<EMA std>.pkl)
    torchrun --standalone --nproc_per_node=2 generate_images.py \\
        --net=training-runs/00000-cd/network-snapshot-0000032-0.100.pkl --outdir=out --seeds=0-63 --grid=out/grid.png
    """
    if preset is not None:
        chosen = config_presets[preset]
        net = net if net is not None else chosen.net
        gnet = gnet if gnet is not None else chosen.get('gnet')
        if sampler_kwargs['guidance'] is None:
            sampler_kwargs['guidance'] = chosen.get('guidance')
    if net is None:
        raise click.ClickException('Give a network with --net or choose a --preset')
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.BadParameter(f'{outdir!r} is a file; expected a folder for the images', param_hint='--outdir')
    if sampler_kwargs['guidance'] is None or sampler_kwargs['guidance'] == 1:
        sampler_kwargs['guidance'] = None
    elif gnet is None:
        raise click.ClickException(f'--guidance={sampler_kwargs["guidance"]} needs a guiding network: pass --gnet '
            '(consistency students take neither: their guidance is set when they are distilled)')

    dist.init()
    kept = []
    with dnnlib.cli.user_errors():
        image_iter = generate_images(net=net, gnet=gnet, outdir=outdir, subdirs=subdirs, seeds=seeds, class_idx=class_idx,
                                     max_batch_size=max_batch_size, sampler_fn=sampler_fn, **sampler_kwargs)
        for r in tqdm.tqdm(image_iter, unit='batch', disable=dist.get_rank() != 0):
            if grid is not None and r.images is not None:
                kept.extend(zip(r.indices.tolist(), r.images.cpu().numpy()))
        if grid is not None:
            kept = sorted(gather_to_rank0(kept), key=lambda item: item[0])
            if dist.get_rank() == 0:
                save_png(image_grid(np.stack([image for _, image in kept])), grid)
                print(f'Saved grid of {len(kept)} images to "{grid}"')
    dist.print0('Done.')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    cmdline()
