"""Build datasets for train_edm2.py: PNG image sets (convert), VAE latent sets (encode) and PNG
sets decoded back from latents (decode); check reads a whole dataset the way training does and
reports every unreadable sample, odd shape and bad label.

Output layout (ZIP or directory): 00000/img00000000.png, ... or 00000/img-mean-std-00000000.npy,
1000 files per folder, and dataset.json with {"labels": [[path, label], ...]} or {"labels": null}.
"""

import concurrent.futures
import io
import json
import math
import multiprocessing
import os
import re
import zipfile

import click
import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

import dnnlib
import dnnlib.cli
from torch_utils.distributed import write_file_atomically
from training import dataset as training_dataset
from training.encoders import StabilityVAEEncoder

#----------------------------------------------------------------------------
# Sources. Each opener returns (names, load, labels): the sorted sample names, a function
# name -> sample (a PIL image, or a numpy array for latents), and a dict name -> label (or None
# when the source has no labels).

def is_image_name(name):
    return os.path.splitext(name)[1].lower() in PIL.Image.registered_extensions()

def is_latent_name(name):
    return name.lower().endswith('.npy')

def parse_labels_json(data, where):
    try:
        labels = json.loads(data)['labels']
        return None if labels is None else {name: label for name, label in labels}
    except (ValueError, KeyError, TypeError) as err:
        raise click.ClickException(f'{where}: expected {{"labels": [[path, label], ...]}} or {{"labels": null}} ({err})')

def open_folder(path, keep, load):
    names = sorted(os.path.relpath(os.path.join(root, fname), path).replace(os.sep, '/')
        for root, _dirs, fnames in os.walk(path) for fname in fnames if keep(fname))
    json_path = os.path.join(path, 'dataset.json')
    labels = None
    if os.path.isfile(json_path):
        with open(json_path, 'rb') as f:
            labels = parse_labels_json(f.read(), json_path)
    return names, lambda name: load(os.path.join(path, name)), labels

def open_zip(path, keep, load):
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise click.ClickException(f'--source {path} is not a readable ZIP archive ({err})') from None
    names = sorted(name for name in archive.namelist() if keep(name))
    labels = None
    if 'dataset.json' in archive.namelist():
        labels = parse_labels_json(archive.read('dataset.json'), f'{path}/dataset.json')
    return names, lambda name: load(io.BytesIO(archive.read(name))), labels

def open_files(source, keep, load, kinds='a directory or a .zip file'):
    if os.path.isdir(source):
        return open_folder(source, keep, load)
    if os.path.isfile(source) and source.lower().endswith('.zip'):
        return open_zip(source, keep, load)
    if not os.path.exists(source):
        raise click.ClickException(f'--source {source} does not exist')
    raise click.ClickException(f'--source {source} must be {kinds}')

def labels_from_folders(names):
    groups = [name.split('/')[0] if '/' in name else '' for name in names]
    group_ids = {group: idx for idx, group in enumerate(sorted(set(groups)))}
    return {name: group_ids[group] for name, group in zip(names, groups)} if len(group_ids) > 1 else None

def open_sklearn_digits(size):
    from sklearn.datasets import load_digits # imported here: only this source needs scikit-learn
    digits = load_digits()
    grey = np.round(digits.images * (255 / 16)).astype(np.uint8) # pixel values are 0..16
    names = [f'digit{idx:04d}' for idx in range(len(grey))]
    images = dict(zip(names, grey))
    labels = dict(zip(names, digits.target.tolist()))
    def load_image(name):
        image = PIL.Image.fromarray(images[name], 'L').convert('RGB')
        return image if size is None else image.resize(size, PIL.Image.BICUBIC) # smooth strokes when upscaling 8x8
    return names, load_image, labels

def open_source(source, size=None):
    if source == 'sklearn-digits':
        return open_sklearn_digits(size)
    names, load_image, labels = open_files(source, is_image_name, PIL.Image.open, 'a directory, a .zip file or sklearn-digits')
    if labels is None and os.path.isdir(source):
        # Without dataset.json labels, images grouped in several top-level folders are labelled by folder.
        labels = labels_from_folders(names)
    return names, load_image, labels

def open_latents(source):
    """The .npy samples of a dataset written by encode; images are listed only to name them in the error."""
    names, load_latents, labels = open_files(source, lambda name: is_latent_name(name) or is_image_name(name), np.load)
    latent_names = [name for name in names if is_latent_name(name)]
    if len(latent_names) == 0 and len(names) > 0:
        raise click.ClickException(f'--source {source} holds images ({names[0]}, ...), not VAE latents; decode reads the .npy files written by encode')
    if len(latent_names) == 0:
        raise click.ClickException(f'--source {source} contains no .npy latents')
    return latent_names, load_latents, labels

def load_rgb(load_image, name, source):
    try:
        with load_image(name) as image:
            return image.convert('RGB')
    except Exception as err:
        raise click.ClickException(f'Cannot read image {name} from {source}: {err}')

def load_mean_std(load_latents, name, source):
    try:
        mean_std = load_latents(name)
    except Exception as err:
        raise click.ClickException(f'Cannot read latents {name} from {source}: {err}')
    if mean_std.ndim != 3 or mean_std.shape[0] != 8:
        raise click.ClickException(f'Latents {name} in {source} have shape {list(mean_std.shape)}; '
            'expected [8, H/8, W/8], the mean and std of the 4 VAE channels as encode writes them')
    return mean_std

#----------------------------------------------------------------------------
# Transforms: PIL image -> PIL image of the requested size, or None to skip the image.

def resize_if_needed(image, size):
    if size is None or image.size == size:
        return image
    return image.resize(size, PIL.Image.LANCZOS)

def center_crop(image, size):
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s)).resize(size, PIL.Image.LANCZOS)

def center_crop_wide(image, size):
    width, height = size
    w, h = image.size
    crop_h = int(np.round(width * h / w))
    if w < width or crop_h < height:
        return None
    top = (h - crop_h) // 2
    band = image.crop((0, top, w, top + crop_h)).resize(size, PIL.Image.LANCZOS)
    canvas = PIL.Image.new('RGB', (width, width))
    canvas.paste(band, (0, (width - height) // 2))
    return canvas

def center_crop_dhariwal(image, size):
    res = size[0]
    while min(image.size) >= 2 * res:
        image = image.resize(tuple(dim // 2 for dim in image.size), PIL.Image.BOX)
    scale = res / min(image.size)
    image = image.resize(tuple(round(dim * scale) for dim in image.size), PIL.Image.BICUBIC)
    left, top = (image.size[0] - res) // 2, (image.size[1] - res) // 2
    return image.crop((left, top, left + res, top + res))

def make_transform(kind, size):
    if kind is None:
        return lambda image: resize_if_needed(image, size)
    if size is None:
        raise click.ClickException(f'--transform={kind} needs --resolution')
    if kind == 'center-crop-dhariwal' and size[0] != size[1]:
        raise click.ClickException(f'--transform=center-crop-dhariwal needs a square --resolution, got {size[0]}x{size[1]}')
    crop = {'center-crop': center_crop, 'center-crop-wide': center_crop_wide, 'center-crop-dhariwal': center_crop_dhariwal}[kind]
    return lambda image: crop(image, size)

#----------------------------------------------------------------------------
# Destination: a ZIP archive (stored, uncompressed) or an empty/new directory. Outputs appear whole:
# a ZIP is written under a temporary name in its folder and renamed at the end; in a directory each
# file is written atomically and dataset.json comes last.

def check_dest(dest):
    if dest.lower().endswith('.zip'):
        if os.path.isdir(dest):
            raise click.ClickException(f'--dest {dest} is a directory; give a .zip path that is a file or does not exist yet')
    elif os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise click.ClickException(f'--dest {dest} must be a .zip path, a new directory or an empty directory')

def write_dataset(dest, fill):
    """Call fill(write), where write(name, data) stores one file of the dataset under dest."""
    check_dest(dest)
    if dest.lower().endswith('.zip'):
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        def write_zip(f):
            with zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_STORED) as archive:
                fill(archive.writestr)
        write_file_atomically(dest, write_zip)
        return
    def write_file(name, data):
        path = os.path.join(dest, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_file_atomically(path, lambda f: f.write(data))
    os.makedirs(dest, exist_ok=True)
    fill(write_file)

def archive_name(idx, stem, ext):
    return f'{idx:08d}'[:5] + f'/{stem}{idx:08d}.{ext}'

def labels_json(entries):
    labelled = all(label is not None for _name, label in entries)
    return json.dumps({'labels': entries if labelled else None}).encode()

def png_bytes(image):
    data = io.BytesIO()
    image.save(data, format='png', compress_level=0, optimize=False)
    return data.getvalue()

#----------------------------------------------------------------------------
# Command line.

def parse_size(_ctx, _param, value):
    if value is None:
        return None
    match = re.fullmatch(r'\s*(\d+)\s*[x,]\s*(\d+)\s*', value)
    if match is None:
        raise click.BadParameter(f'expected WIDTHxHEIGHT (or WIDTH,HEIGHT), e.g. 64x64; got {value!r}')
    return int(match.group(1)), int(match.group(2))

@click.group()
def cli():
    """Convert image collections to EDM2 dataset archives, encode them into VAE latents, check datasets.

    \b
    python dataset_tool.py convert --source=sklearn-digits --dest=datasets/digits16.zip --resolution=16x16
    python dataset_tool.py convert --source=downloads/imagenet/train --dest=datasets/img512.zip \\
        --resolution=512x512 --transform=center-crop-dhariwal
    python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip
    python dataset_tool.py decode --source=datasets/img512-sd.zip --dest=datasets/img512-decoded.zip
    python dataset_tool.py check --source=datasets/img512-sd.zip
    """
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size != 1:
        raise click.ClickException(f'dataset_tool.py runs as a single process; found WORLD_SIZE={world_size}, launch it without torchrun')

def check_output_size(size, first_size, name):
    width, height = size
    if width != height or width & (width - 1) != 0:
        raise click.ClickException(f'Image {name} comes out {width}x{height}; outputs must be square with a power-of-two side (use --resolution/--transform)')
    if size != first_size:
        raise click.ClickException(f'Image {name} comes out {width}x{height}, earlier images {first_size[0]}x{first_size[1]}; use --resolution to get one size')

@cli.command()
@click.option('--source', help='Image directory, ZIP archive, or sklearn-digits', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output .zip archive or directory', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Use at most this many source images', metavar='INT', type=click.IntRange(min=1))
@click.option('--transform', help='How to bring images to the output size', type=click.Choice(['center-crop', 'center-crop-wide', 'center-crop-dhariwal']))
@click.option('--resolution', help='Output size', metavar='WxH', type=str, callback=parse_size)
def convert(source, dest, max_images, transform, resolution):
    """Write images as a PNG dataset with labels in dataset.json."""
    names, load_image, labels = open_source(source, resolution)
    names = names[:max_images]
    if len(names) == 0:
        raise click.ClickException(f'--source {source} contains no images')
    apply_transform = make_transform(transform, resolution)
    check_dest(dest)
    labels = labels or {}
    def fill(write):
        entries = []
        first_size = None
        for idx, name in enumerate(tqdm(names, desc='convert', unit='img')):
            image = apply_transform(load_rgb(load_image, name, source))
            if image is None:
                continue # skipped images keep their index, as in EDM2
            first_size = first_size or image.size
            check_output_size(image.size, first_size, name)
            out_name = archive_name(idx, 'img', 'png')
            write(out_name, png_bytes(image))
            entries.append([out_name, labels.get(name)])
        write('dataset.json', labels_json(entries))
    write_dataset(dest, fill)

def load_vae(model_url):
    """The VAE with one image per call, on CUDA when available, else on the CPU."""
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    vae = StabilityVAEEncoder(vae_name=model_url, batch_size=1)
    try:
        vae.init(device)
    except (OSError, RuntimeError) as err:
        raise click.ClickException(f'--model-url: {err}')
    return vae, device

@cli.command()
@click.option('--model-url', help='VAE: Hugging Face name or local diffusers directory', metavar='URL', type=str, default='stabilityai/sd-vae-ft-mse', show_default=True)
@click.option('--source', help='Image dataset: directory or ZIP archive', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output .zip archive or directory', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Use at most this many source images', metavar='INT', type=click.IntRange(min=1))
def encode(model_url, source, dest, max_images):
    """Encode an image dataset into VAE latents (mean and std, float32 NPY)."""
    names, load_image, labels = open_source(source)
    names = names[:max_images]
    if len(names) == 0:
        raise click.ClickException(f'--source {source} contains no images')
    check_dest(dest)
    vae, device = load_vae(model_url)
    labels = labels or {}
    def fill(write):
        entries = []
        for idx, name in enumerate(tqdm(names, desc='encode', unit='img')):
            pixels = np.asarray(load_rgb(load_image, name, source))
            pixels = torch.from_numpy(pixels.copy()).permute(2, 0, 1).unsqueeze(0).to(device)
            latents = vae.encode_pixels(pixels)[0].cpu().numpy()
            data = io.BytesIO()
            np.save(data, latents)
            out_name = archive_name(idx, 'img-mean-std-', 'npy')
            write(out_name, data.getvalue())
            entries.append([out_name, labels.get(name)])
        write('dataset.json', labels_json(entries))
    write_dataset(dest, fill)

@cli.command()
@click.option('--model-url', help='VAE: Hugging Face name or local diffusers directory', metavar='URL', type=str, default='stabilityai/sd-vae-ft-mse', show_default=True)
@click.option('--source', help='Latent dataset written by encode: directory or ZIP archive', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output .zip archive or directory', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Use at most this many source latents', metavar='INT', type=click.IntRange(min=1))
def decode(model_url, source, dest, max_images):
    """Decode a VAE latent dataset back into a PNG dataset with the same labels.

    Each image is decoded from the stored posterior mean (the std half is not used), so the output
    does not depend on random numbers. EDM2's decode instead decodes one posterior sample,
    mean + std * noise, the way training draws latents.
    """
    names, load_latents, labels = open_latents(source)
    names = names[:max_images]
    check_dest(dest)
    vae, device = load_vae(model_url)
    labels = labels or {}
    def fill(write):
        entries = []
        for idx, name in enumerate(tqdm(names, desc='decode', unit='img')):
            mean = torch.from_numpy(load_mean_std(load_latents, name, source)[:4]).unsqueeze(0).to(device, torch.float32)
            final = vae.encode_latents(torch.cat([mean, torch.zeros_like(mean)], dim=1)) # zero std: the scaled mean, no noise
            pixels = vae.decode(final)[0].permute(1, 2, 0).cpu().numpy()
            out_name = archive_name(idx, 'img', 'png')
            write(out_name, png_bytes(PIL.Image.fromarray(pixels, 'RGB')))
            entries.append([out_name, labels.get(name)])
        write('dataset.json', labels_json(entries))
    write_dataset(dest, fill)

#----------------------------------------------------------------------------
# check: read every sample with the training code's reader, in worker processes.

_scan_folder = None # the SampleFolder of a worker process

def _start_scan_worker(folder):
    global _scan_folder
    _scan_folder = folder

def scan_samples(folder, raw_indices):
    """Decode the given samples: ({(shape, dtype): [raw index, ...]}, [(raw index, what is wrong), ...])."""
    folder = _scan_folder if folder is None else folder
    kinds, failures = {}, []
    for raw_idx in raw_indices:
        try:
            array = folder.read_sample(raw_idx)
        except training_dataset.DatasetError as err:
            cause = err.__cause__ or err
            failures.append((raw_idx, f'cannot be read ({type(cause).__name__}: {cause})'))
            continue
        kinds.setdefault((tuple(array.shape), str(array.dtype)), []).append(raw_idx)
    return kinds, failures

def default_workers():
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError: # not on Linux
        count = os.cpu_count() or 1
    return max(1, min(count, 16))

def scan_in_parallel(folder, workers):
    """scan_samples() over all samples of `folder` in `workers` processes, with a progress bar."""
    num = len(folder.sample_names)
    chunk = max(1, min(256, math.ceil(num / (workers * 4))))
    chunks = [range(start, min(start + chunk, num)) for start in range(0, num, chunk)]
    workers = min(workers, len(chunks))
    kinds, failures = {}, []
    def merge(result):
        for key, indices in result[0].items():
            kinds.setdefault(key, []).extend(indices)
        failures.extend(result[1])
    with tqdm(total=num, desc='check', unit='img') as progress:
        if workers == 1:
            for indices in chunks:
                merge(scan_samples(folder, indices))
                progress.update(len(indices))
        else:
            # spawn, not fork: the workers start clean, whatever threads this process runs
            context = multiprocessing.get_context('spawn')
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_scan_worker,
                    initargs=(folder,)) as pool:
                futures = {pool.submit(scan_samples, None, indices): len(indices) for indices in chunks}
                try:
                    for future in concurrent.futures.as_completed(futures):
                        merge(future.result())
                        progress.update(futures[future])
                except concurrent.futures.process.BrokenProcessPool as err:
                    raise click.ClickException(f'A check worker process died ({err}); try fewer --workers') from err
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    return kinds, failures

def shape_problems(folder, kinds):
    """(raw index, what is wrong) for samples whose shape or dtype differs from the most common one,
    and for a most common shape that training cannot use."""
    names = folder.sample_names
    if not kinds:
        return None, []
    # The most common kind is the reference; of equally common ones, the one of the lowest-numbered sample.
    reference = min(kinds, key=lambda key: (-len(kinds[key]), min(kinds[key])))
    shape, dtype = reference
    count = len(kinds[reference])
    problems = []
    for key, indices in kinds.items():
        if key != reference:
            problems += [(idx, f'has shape {list(key[0])} {key[1]}, but {count} of the {len(names)} samples have '
                f'{list(shape)} {dtype}; all samples must have one shape') for idx in indices]
    first = min(kinds[reference])
    _channels, height, width = shape
    is_image = not names[first].lower().endswith('.npy')
    common = f'(the size of {count} of the {len(names)} samples)'
    if height != width:
        problems.append((first, f'is {width}x{height} {common}; training needs square samples'))
    elif is_image and width & (width - 1) != 0:
        problems.append((first, f'is {width}x{height} {common}; images must have a power-of-two side'))
    return reference, problems

@cli.command()
@click.option('--source', help='Dataset ZIP or directory, as train_edm2.py --data reads it', metavar='PATH', type=str, required=True)
@click.option('--workers', help='Worker processes  [default: CPU count, at most 16]', metavar='INT', type=click.IntRange(min=1))
def check(source, workers):
    """Read every sample and label of a dataset and report what training would stumble on.

    Exits with 0 and a one-line summary when the dataset is usable, else lists the problems
    (the file and what is wrong) and exits with 1.
    """
    with dnnlib.cli.user_errors():
        folder = training_dataset.SampleFolder(source)
        names = folder.sample_names
        problems = [] # (raw index, file name, what is wrong)
        try:
            labels, label_problems = folder.read_labels()
        except training_dataset.DatasetError as err:
            labels, label_problems = None, [('dataset.json', f'cannot be used: {err.__cause__ or err}')]
        order = {name: idx for idx, name in enumerate(names)}
        problems += [(order.get(name, len(names)), name, what) for name, what in label_problems]
        folder.close() # workers open their own handle
        kinds, failures = scan_in_parallel(folder, workers or default_workers())
        reference, wrong_shapes = shape_problems(folder, kinds)
        problems += [(idx, names[idx], what) for idx, what in failures + wrong_shapes]

    if problems:
        problems.sort(key=lambda problem: problem[0])
        click.echo(f'{source}: {len(problems)} problem{"s" if len(problems) > 1 else ""} in {len(names)} samples:', err=True)
        for _idx, name, what in problems[:20]:
            click.echo(f'  {name} {what}', err=True)
        if len(problems) > 20:
            click.echo(f'  ... and {len(problems) - 20} more', err=True)
        click.get_current_context().exit(1)

    shape, dtype = reference
    if labels is None:
        label_text = 'no labels (label_dim 0)'
    elif labels.dtype == np.int64:
        label_text = f'class labels (label_dim {int(labels.max()) + 1})'
    else:
        label_text = f'vector labels (label_dim {labels.shape[1]})'
    click.echo(f'{source}: OK, {len(names)} samples of shape {list(shape)} {dtype}, {label_text}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    cli()

#----------------------------------------------------------------------------
