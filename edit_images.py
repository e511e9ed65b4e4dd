"""Zero-shot editing with EDM2 models and few-step consistency students: inpainting, colourisation,
super-resolution and interpolation between seeds (Song et al. 2023, Algorithm 4 and §5; docs/editing.md)."""

import os

import click
import numpy as np
import PIL.Image
import torch
import tqdm

import dnnlib
import dnnlib.cli
import generate_images
from generate_images import StackedRandomGenerator
from torch_utils import distributed as dist
from torch_utils import misc
from training import editing
from training.dataset import DatasetError, ImageFolderDataset
from training.encoders import StandardRGBEncoder

#----------------------------------------------------------------------------

EDITS = ('inpaint', 'colorize', 'superres', 'interpolate')
# generate_images.SAMPLERS behind --sampler. Edits: Alg. 4 on the student's grid (fresh noise at every node),
# or Heun. Interpolation: the deterministic samplers, whose samples at the two ends are generate_images' own.
EDIT_SAMPLERS = {'student': 'stochastic', 'heun': 'heun'}
INTERPOLATION_SAMPLERS = {'student': 'euler', 'heun': 'heun'}


class EditError(dnnlib.UserError):
    """A network, source, mask or option that cannot be used for the requested edit."""


def is_pixel_model(encoder):
    """Whether the network samples pixels ([-1, 1], generate_images' default StandardRGBEncoder) rather than latents."""
    return type(encoder).__name__ == StandardRGBEncoder.__name__


def load_network(net, sampler, num_steps, class_idx, samplers, device, verbose):
    """(network, encoder, sampler function, its settings); sampler None: 'student' for students, else 'heun'."""
    net, _gnet, encoder, cd = dist.node_first(generate_images.load_networks, net, None, False, None, device, verbose)
    sampler = sampler or ('student' if cd is not None else 'heun')
    if sampler == 'student' and cd is None:
        raise EditError('--sampler=student needs a consistency student (a network pickle with a "cd" entry); '
            'this is an EDM2 model: use --sampler=heun')
    if class_idx is not None and not 0 <= class_idx < net.label_dim:
        raise EditError(f'--class={class_idx} is out of range for a network with {net.label_dim} classes')
    sampler_fn, sampler_kwargs = generate_images.resolve_sampler(samplers[sampler], cd, dict(num_steps=num_steps))
    return net.to(device), encoder, sampler_fn, sampler_kwargs


def seed_labels(net, rnd, class_idx, given=None, device='cpu'):
    """The labels generate_images draws per seed (so the random stream stays the same), replaced by the
    source's `given` labels unless `class_idx` is set; None for an unconditional network."""
    labels = generate_images.seed_labels(net.label_dim, rnd, class_idx, device)
    return given.to(device) if labels is not None and given is not None and class_idx is None else labels

#----------------------------------------------------------------------------
# Source images and the edit's operator.

def encode(encoder, pixels):
    """The network's tensors of uint8 images; for VAE latents the posterior mean, so that an edit depends on its seed only."""
    if is_pixel_model(encoder):
        return encoder.encode(pixels)
    mean, _std = encoder.encode_pixels(pixels).chunk(2, dim=1)
    return encoder.encode_latents(torch.cat([mean, torch.zeros_like(mean)], dim=1))


def open_source(path, net, encoder, device):
    """The source images as an ImageFolderDataset whose images (encoded) and labels fit the network."""
    try:
        dataset = ImageFolderDataset(path, use_labels=net.label_dim > 0)
        resolution = dataset.resolution
        first = encode(encoder, torch.as_tensor(dataset[0][0][None]).to(device))
    except DatasetError as err:
        raise EditError(f'--source: {err}') from None
    wanted = [net.img_channels, net.img_resolution, net.img_resolution]
    if list(first.shape[1:]) != wanted:
        encoded = '' if is_pixel_model(encoder) else f', encoded to {list(first.shape[1:])},'
        raise EditError(f'--source: {path} holds {dataset.num_channels}-channel {resolution}x{resolution} images{encoded} '
            f'but the network takes [channels, height, width] = {wanted}')
    if dataset.has_labels and dataset.has_onehot_labels and dataset.label_dim > net.label_dim:
        raise EditError(f'--source: {path} has class labels up to {dataset.label_dim - 1}; the network has {net.label_dim} classes')
    if dataset.has_labels and not dataset.has_onehot_labels and dataset.label_dim != net.label_dim:
        raise EditError(f'--source: {path} has {dataset.label_dim}-dimensional labels; the network takes {net.label_dim}')
    return dataset


def source_labels(dataset, indices, net):
    """The source's labels of images `indices` as the network takes them (class indices one-hot to its label_dim)."""
    raw = torch.as_tensor(np.stack([dataset.get_details(i).raw_label for i in indices]))
    return torch.eye(net.label_dim)[raw] if dataset.has_onehot_labels else raw


def parse_box(ctx, param, value):
    """'x0,y0,x1,y1' -> four integers (click callback); the box is x0 <= x < x1, y0 <= y < y1."""
    if value is None:
        return None
    parts = value.split(',')
    if len(parts) != 4 or not all(part.strip().isdigit() for part in parts):
        raise click.BadParameter(f'"{value}" is not four integers x0,y0,x1,y1')
    return tuple(int(part) for part in parts)


def read_hole(mask, box, resolution):
    """The region to fill as a bool tensor [1, 1, R, R]: white (>= 128) pixels of the --mask PNG, or the --box."""
    if (mask is None) == (box is None):
        raise EditError('--edit=inpaint needs the region to fill: give either --mask=PNG or --box=x0,y0,x1,y1')
    if box is not None:
        x0, y0, x1, y1 = box
        if not (x0 < x1 <= resolution and y0 < y1 <= resolution):
            raise EditError(f'--box={x0},{y0},{x1},{y1} must satisfy x0 < x1 <= {resolution} and y0 < y1 <= {resolution} '
                '(the source resolution)')
        hole = np.zeros([resolution, resolution], dtype=bool)
        hole[y0:y1, x0:x1] = True
    else:
        try:
            with PIL.Image.open(mask) as image:
                hole = np.asarray(image.convert('L')) >= 128
        except (OSError, PIL.UnidentifiedImageError) as err:
            raise EditError(f'--mask: cannot read {mask} as an image ({err})') from None
        if hole.shape != (resolution, resolution):
            raise EditError(f'--mask: {mask} is {hole.shape[1]}x{hole.shape[0]}, the source images are {resolution}x{resolution}')
    return torch.as_tensor(hole)[None, None]


def make_operators(edit, mask, box, factor, resolution, net, encoder):
    """(operator in the network's space, operator on the pixels for showing the degraded input)."""
    pixel = is_pixel_model(encoder)
    if edit == 'inpaint':
        hole = read_hole(mask, box, resolution)
        network_hole = hole if pixel else editing.latent_hole(hole, net.img_resolution)
        return editing.inpainting(network_hole), editing.inpainting(hole)
    if not pixel:
        what = {'colorize': 'luminance', 'superres': 'block means'}[edit]
        raise EditError(f'--edit={edit} needs a pixel-space network; this one samples the latents of '
            f'{type(encoder).__name__}, which are not a linear function of the pixels, so their {what} cannot be '
            'fixed (latent models support --edit=inpaint and --edit=interpolate)')
    if edit == 'colorize':
        if net.img_channels != 3:
            raise EditError(f'--edit=colorize needs RGB images; the network has {net.img_channels} channels')
        operator = editing.Colorization()
    else:
        if resolution % factor:
            raise EditError(f'--factor={factor} must divide the resolution {resolution}')
        operator = editing.superresolution(factor)
    return operator, operator

#----------------------------------------------------------------------------

def edit_images(net, source, edit, mask=None, box=None, factor=2, outdir=None, seeds=range(8), class_idx=None,
                max_batch_size=32, sampler=None, num_steps=None, reconstruction=0, resample=1, verbose=True, device=None):
    """Edit source image number seed % N (N images in `source`) once per seed and save the results as PNGs
    to `outdir` (None: don't), split across ranks like generate_images.generate_images().

    `edit` is 'inpaint' (the hole: --mask PNG or --box), 'colorize' or 'superres' (blocks of `factor`).
    `sampler` 'student' (default for students) runs Alg. 4 on the student's grid, 'heun' (default for
    EDM2 models) EDM's Heun sampler with the same replacement; `reconstruction` > 0 adds reconstruction
    guidance of that weight and `resample` > 1 denoises that often per evaluation (training/editing.py,
    docs/editing.md). Labels: `class_idx`, else the source's,
    else drawn per seed as generate_images does. Returns a BatchIterable of EasyDict(source, degraded,
    images, labels, batch_idx, num_batches, indices, seeds), uint8 images (None for an empty batch).
    """
    device = torch.device(device) if device is not None else misc.default_device()
    net, encoder, sampler_fn, sampler_kwargs = load_network(net, sampler, num_steps, class_idx, EDIT_SAMPLERS, device, verbose)
    dataset = open_source(source, net, encoder, device)
    operator, pixel_operator = make_operators(edit, mask, box, factor, dataset.resolution, net, encoder)
    to_pixels = StandardRGBEncoder()
    batches = generate_images.rank_batches(len(seeds), max_batch_size)
    if verbose:
        dist.print0(f'Editing ({edit}) {len(seeds)} images of {source}' + (f' to "{outdir}"' if outdir else '') + ' ...')

    def edit_batch(batch_idx, indices):
        r = dnnlib.EasyDict(source=None, degraded=None, images=None, labels=None, batch_idx=batch_idx,
                            num_batches=len(batches), indices=indices, seeds=[seeds[i] for i in indices])
        if not r.seeds:
            return r
        positions = [seed % len(dataset) for seed in r.seeds]
        r.source = torch.as_tensor(np.stack([dataset[i][0] for i in positions])).to(device)
        given = source_labels(dataset, positions, net) if dataset.has_labels else None
        rnd = StackedRandomGenerator(device, r.seeds)
        noise = rnd.randn([len(r.seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
        r.labels = seed_labels(net, rnd, class_idx, given, device)
        with torch.no_grad():
            latents = editing.edit(sampler_fn, net, noise, operator, encode(encoder, r.source), r.labels,
                                   guidance=reconstruction, resample=resample, randn_like=rnd.randn_like, **sampler_kwargs)
            generate_images.refuse_non_finite(latents, r.seeds, writing=outdir is not None)
            r.images = encoder.decode(latents)
            r.degraded = to_pixels.decode(pixel_operator.degraded(to_pixels.encode(r.source)))
        if outdir is not None:
            for seed, image in zip(r.seeds, r.images.cpu().numpy()):
                generate_images.save_png(image, generate_images.image_path(outdir, seed))
        return r

    return generate_images.BatchIterable(len(batches), lambda: _in_step(batches, edit_batch))


def interpolation_path(outdir, seed0, seed1, frame):
    return os.path.join(outdir, f'{seed0:06d}-{seed1:06d}-{frame:02d}.png')


def interpolate_images(net, seeds=(0, 1), num_frames=8, outdir=None, class_idx=None, max_batch_size=32, sampler=None,
                       num_steps=None, verbose=True, device=None):
    """For each pair of consecutive seeds (A, B, C, D: A to B and C to D), sample num_frames images from the
    slerp of the two seeds' noises (labels move linearly), t = 0 ... 1, with a deterministic sampler, so
    that the first and last frames are generate_images' samples of the two seeds. PNGs go to `outdir` as
    <A>-<B>-<frame>.png. Returns a BatchIterable of EasyDict(images, labels, batch_idx, num_batches,
    indices, frames) with frames a list of (A, B, frame number).
    """
    if len(seeds) % 2:
        raise EditError(f'--seeds: interpolation takes pairs of seeds (A,B,C,D interpolates A to B and C to D); '
            f'got {len(seeds)} seeds')
    device = torch.device(device) if device is not None else misc.default_device()
    net, encoder, sampler_fn, sampler_kwargs = load_network(net, sampler, num_steps, class_idx, INTERPOLATION_SAMPLERS, device, verbose)
    times = editing.frame_times(num_frames)
    frames = [(a, b, k) for a, b in zip(seeds[0::2], seeds[1::2]) for k in range(num_frames)]
    batches = generate_images.rank_batches(len(frames), max_batch_size)
    if verbose:
        dist.print0(f'Interpolating {len(seeds) // 2} seed pairs, {num_frames} frames each ...')

    def interpolate_batch(batch_idx, indices):
        r = dnnlib.EasyDict(images=None, labels=None, batch_idx=batch_idx, num_batches=len(batches), indices=indices,
                            frames=[frames[i] for i in indices])
        if not r.frames:
            return r
        shape = [len(r.frames), net.img_channels, net.img_resolution, net.img_resolution]
        ends = [StackedRandomGenerator(device, [frame[end] for frame in r.frames]) for end in (0, 1)]
        noises = [rnd.randn(shape, device=device) for rnd in ends]
        labels = [seed_labels(net, rnd, class_idx, device=device) for rnd in ends]
        t = [times[k] for _a, _b, k in r.frames]
        r.labels = editing.lerp_labels(*labels, t)
        with torch.no_grad():
            latents = sampler_fn(net=net, noise=editing.slerp(*noises, t), labels=r.labels, **sampler_kwargs)
            generate_images.refuse_non_finite(latents, [f'{a}-{b}/{k}' for a, b, k in r.frames], writing=outdir is not None)
            r.images = encoder.decode(latents)
        if outdir is not None:
            for frame, image in zip(r.frames, r.images.cpu().numpy()):
                generate_images.save_png(image, interpolation_path(outdir, *frame))
        return r

    return generate_images.BatchIterable(len(batches), lambda: _in_step(batches, interpolate_batch))


def _in_step(batches, make_batch):
    for batch_idx, indices in enumerate(batches):
        r = make_batch(batch_idx, indices)
        dist.barrier()  # the ranks move through the batches together
        yield r

#----------------------------------------------------------------------------
# Command line.

def row_grid(rows):
    """uint8 rows [R][N, C, H, W] -> one CHW image, R rows of N images."""
    return np.concatenate([np.concatenate(list(row), axis=2) for row in rows], axis=1)


def _collect(image_iter, fields):
    """(index, {field: uint8 array}) of this rank's results, gathered on rank 0 in index order."""
    kept = []
    for r in tqdm.tqdm(image_iter, unit='batch', disable=dist.get_rank() != 0):
        if r.images is not None:
            kept.extend((index, {field: r[field][i].cpu().numpy() for field in fields}) for i, index in enumerate(r.indices.tolist()))
    return [item for _index, item in sorted(generate_images.gather_to_rank0(kept), key=lambda item: item[0])]


def _refuse_unused(edit, **given):
    """Options that the chosen edit does not use are errors (none is silently ignored)."""
    for option, (value, edits) in given.items():
        if value is not None and edit not in edits:
            raise click.BadParameter(f'is not used by --edit={edit} (only by --edit={"/".join(edits)})', param_hint=f'--{option}')


@click.command()
@click.option('--net', help='Network pickle to edit with (path or URL): a student or an EDM2 model', metavar='PKL|URL', required=True)
@click.option('--edit', help='What to do', type=click.Choice(EDITS), required=True)
@click.option('--source', help='Images to edit: a dataset folder or ZIP (seed k edits image number k mod N)', metavar='ZIP|DIR')
@click.option('--mask', help='inpaint: PNG of the source resolution, white where the image is filled in', metavar='PNG')
@click.option('--box', help='inpaint: fill the box x0 <= x < x1, y0 <= y < y1', metavar='x0,y0,x1,y1', callback=parse_box)
@click.option('--factor', help='superres: block size of the known block means  [default: 2]', metavar='INT', type=click.IntRange(min=2))
@click.option('--frames', 'num_frames', help='interpolate: images per seed pair  [default: 8]', metavar='INT', type=click.IntRange(min=2))
@click.option('--outdir', help='Directory for the PNG files', metavar='DIR', required=True)
@click.option('--seeds', help='Seeds, e.g. 0-7; interpolate pairs them (A,B,C,D: A to B, C to D)', metavar='LIST', type=generate_images.parse_int_list, default='0-7', show_default=True)
@click.option('--class', 'class_idx', help='Class index for all images [default: the source\'s labels, else random per seed]', metavar='INT', type=click.IntRange(min=0))
@click.option('--batch', 'max_batch_size', help='Largest batch per process', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--grid', help='Also save a mosaic: source, degraded and result rows (interpolate: a row per pair)', metavar='FILE.png')
@click.option('--sampler', help='student (S steps with fresh noise; the default for students) or heun (the default for EDM2 models)', type=click.Choice(sorted(EDIT_SAMPLERS)))
@click.option('--steps', 'num_steps', help='Number of noise levels [default: S for students, else 32]', metavar='INT', type=click.IntRange(min=1))
@click.option('--reconstruction', help='Reconstruction guidance weight: also steer the filled-in part by the known part through the network\'s gradient; 0 is the plain replacement of Alg. 4  [default: 0]', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--resample', help='Denoise R times at every noise level, re-noising in between, so that the filled-in and known parts settle (R times the evaluations)  [default: 1]', metavar='R', type=click.IntRange(min=1))
@click.option('--compare', help='A second network (e.g. the teacher) that edits the same seeds with its default sampler and steps, into OUTDIR/compare and a further grid row', metavar='PKL|URL')
def cmdline(net, edit, source, mask, box, factor, num_frames, outdir, seeds, class_idx, max_batch_size, grid, sampler,
            num_steps, reconstruction, resample, compare):
    """Edit images zero-shot with a consistency student or an EDM2 model.

    \b
    Examples:
    # Fill the right half of 16x16 digits with a 4-step student, plus a mosaic
    python edit_images.py --net=student.pkl --edit=inpaint --source=digits-16.zip --box=8,0,16,16 \\
        --outdir=out/inpaint --seeds=0-9 --grid=out/inpaint.png --compare=teacher.pkl
    \b
    # Interpolate seed 0 to seed 1 and seed 2 to seed 3 in 8 frames
    python edit_images.py --net=student.pkl --edit=interpolate --outdir=out/interp --seeds=0-3
    """
    interpolate = edit == 'interpolate'
    _refuse_unused(edit, source=(source, EDITS[:3]), mask=(mask, ['inpaint']), box=(box, ['inpaint']),
                   factor=(factor, ['superres']), frames=(num_frames, ['interpolate']),
                   reconstruction=(reconstruction, EDITS[:3]), resample=(resample, EDITS[:3]))
    if not interpolate and source is None:
        raise click.BadParameter(f'--edit={edit} needs the images to edit', param_hint='--source')
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.BadParameter(f'{outdir!r} is a file; expected a folder for the images', param_hint='--outdir')
    factor, num_frames = factor or 2, num_frames or 8
    common = dict(class_idx=class_idx, max_batch_size=max_batch_size)
    if interpolate:
        run = lambda pkl, out, **kwargs: interpolate_images(pkl, seeds, num_frames, outdir=out, **kwargs)
        fields = ['images']
    else:
        run = lambda pkl, out, **kwargs: edit_images(pkl, source, edit, mask=mask, box=box, factor=factor, outdir=out,
                                                     seeds=seeds, reconstruction=reconstruction or 0,
                                                     resample=resample or 1, **kwargs)
        fields = ['source', 'degraded', 'images']

    dist.init()
    with dnnlib.cli.user_errors():
        # Both networks are loaded and checked before anything is written.
        runs = [(run(net, outdir, sampler=sampler, num_steps=num_steps, **common), fields)]
        if compare is not None:
            runs.append((run(compare, os.path.join(outdir, 'compare'), **common), ['images']))
        results = [_collect(image_iter, run_fields) for image_iter, run_fields in runs]
        if grid is not None and dist.get_rank() == 0:
            if interpolate:
                rows = [np.stack([item['images'] for item in kept[i:i + num_frames]])
                        for kept in results for i in range(0, len(kept), num_frames)]
            else:
                rows = [np.stack([item[field] for item in results[0]]) for field in fields]
                rows += [np.stack([item['images'] for item in kept]) for kept in results[1:]]
            generate_images.save_png(row_grid(rows), grid)
            print(f'Saved grid of {len(rows)} rows to "{grid}"')
    dist.print0('Done.')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    cmdline()

#----------------------------------------------------------------------------
