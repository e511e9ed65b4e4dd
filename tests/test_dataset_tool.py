import json
import os
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

import dataset_tool
from helpers import (invoke, latent_files, make_digits_zip, png_bytes, random_images, run_script, script_env,
    write_dataset, write_zip)
from training.dataset import ImageFolderDataset
from training.encoders import StabilityVAEEncoder

#----------------------------------------------------------------------------

def save_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(array).save(path)

#----------------------------------------------------------------------------
# Round trips through real subprocesses.

def test_zip_round_trip_with_labels(tmp_path):
    images = random_images(5)
    names = ['b/x.png', 'a/2.png', 'a/10.png', 'c.png', 'b/y.jpg.png']
    classes = [3, 0, 1, 2, 1]
    for name, image in zip(names, images):
        save_png(str(tmp_path / 'src' / name), image)
    (tmp_path / 'src' / 'dataset.json').write_text(json.dumps({'labels': [[n, c] for n, c in zip(names, classes)]}))
    dest = str(tmp_path / 'out' / 'set.zip')

    run_script('dataset_tool.py', 'convert', f'--source={tmp_path / "src"}', f'--dest={dest}')

    with zipfile.ZipFile(dest) as archive:
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
        assert archive.namelist()[-1] == 'dataset.json'
        assert sorted(archive.namelist()[:-1]) == [f'00000/img{idx:08d}.png' for idx in range(5)]
    ds = ImageFolderDataset(dest, use_labels=True)
    assert len(ds) == 5 and ds.resolution == 8 and ds.num_channels == 3 and ds.label_dim == 4
    order = sorted(range(5), key=lambda idx: names[idx]) # sources are read in sorted path order
    for out_idx, src_idx in enumerate(order):
        image, label = ds[out_idx]
        np.testing.assert_array_equal(image, images[src_idx].transpose(2, 0, 1))
        assert int(np.argmax(label)) == classes[src_idx] and label.sum() == 1

def test_sklearn_digits(tmp_path):
    from sklearn.datasets import load_digits
    dest = make_digits_zip(tmp_path / 'digits.zip')  # dataset_tool.py convert --source=sklearn-digits --resolution=16x16

    digits = load_digits()
    ds = ImageFolderDataset(dest, use_labels=True, resolution=16)
    assert len(ds) == 1797
    assert ds.image_shape == [3, 16, 16] and ds.label_dim == 10
    with zipfile.ZipFile(dest) as archive:
        labels = json.loads(archive.read('dataset.json'))['labels']
    assert [label for _name, label in labels] == digits.target.tolist()
    assert sorted(set(digits.target.tolist())) == list(range(10))
    for idx in [0, 5, 1796]:
        image, label = ds[idx]
        assert int(np.argmax(label)) == digits.target[idx]
        assert np.array_equal(image[0], image[1]) and np.array_equal(image[0], image[2])
        # Averaging 2x2 blocks recovers the 8x8 digit up to interpolation blur.
        pooled = image[0].astype(np.float64).reshape(8, 2, 8, 2).mean(axis=(1, 3))
        assert np.corrcoef(pooled.ravel(), digits.images[idx].ravel())[0, 1] > 0.9

def test_refuses_multiple_processes(tmp_path):
    result = run_script('dataset_tool.py', 'convert', '--source=sklearn-digits', f'--dest={tmp_path / "d.zip"}',
        env=script_env(WORLD_SIZE='2'), check=False)
    assert result.returncode != 0 and 'WORLD_SIZE' in result.stderr
    assert not os.path.exists(tmp_path / 'd.zip')

#----------------------------------------------------------------------------
# Conversion options, run in-process through click.

def test_folder_dest_dir_labels_and_max_images(tmp_path):
    images = random_images(6)
    for idx, image in enumerate(images):
        save_png(str(tmp_path / 'src' / ['cats', 'dogs'][idx % 2] / f'{idx}.png'), image)
    dest = str(tmp_path / 'out')
    result = invoke(dataset_tool.cli, 'convert', f'--source={tmp_path / "src"}', f'--dest={dest}', '--max-images=4')
    assert result.exit_code == 0, result.output
    ds = ImageFolderDataset(dest, use_labels=True)
    assert len(ds) == 4 # sorted: cats/0, cats/2, cats/4, dogs/1
    assert [int(np.argmax(ds[idx][1])) for idx in range(4)] == [0, 0, 0, 1]
    np.testing.assert_array_equal(ds[3][0], images[1].transpose(2, 0, 1))

def test_unlabelled_source_writes_null_labels(tmp_path):
    for idx, image in enumerate(random_images(2)):
        save_png(str(tmp_path / 'src' / f'{idx}.png'), image)
    dest = str(tmp_path / 'out.zip')
    assert invoke(dataset_tool.cli, 'convert', f'--source={tmp_path / "src"}', f'--dest={dest}').exit_code == 0
    with zipfile.ZipFile(dest) as archive:
        assert json.loads(archive.read('dataset.json')) == {'labels': None}

def test_zip_source_and_resize(tmp_path):
    files = {f'img{idx}.png': png_bytes(image) for idx, image in enumerate(random_images(3, size=12))}
    source = write_dataset(tmp_path / 'src', files, [[f'img{idx}.png', idx] for idx in range(3)], as_zip=True)
    dest = str(tmp_path / 'out.zip')
    result = invoke(dataset_tool.cli, 'convert', f'--source={source}', f'--dest={dest}', '--resolution=4,4')
    assert result.exit_code == 0, result.output
    ds = ImageFolderDataset(dest, use_labels=True)
    assert ds.image_shape == [3, 4, 4] and ds.label_dim == 3

def test_center_crop_keeps_the_middle(tmp_path):
    image = np.zeros([8, 12, 3], dtype=np.uint8)
    image[:, :2] = [255, 0, 0]
    image[:, 2:10] = [0, 255, 0]
    image[:, 10:] = [0, 0, 255]
    save_png(str(tmp_path / 'src' / 'wide.png'), image)
    dest = str(tmp_path / 'out.zip')
    result = invoke(dataset_tool.cli, 'convert', f'--source={tmp_path / "src"}', f'--dest={dest}', '--transform=center-crop', '--resolution=8x8')
    assert result.exit_code == 0, result.output
    out, _ = ImageFolderDataset(dest)[0]
    np.testing.assert_array_equal(out.transpose(1, 2, 0), image[:, 2:10])

def test_center_crop_wide_letterboxes(tmp_path):
    save_png(str(tmp_path / 'src' / 'a.png'), np.full([8, 16, 3], 200, dtype=np.uint8))
    save_png(str(tmp_path / 'src' / 'b_too_small.png'), np.full([4, 6, 3], 200, dtype=np.uint8))
    dest = str(tmp_path / 'out')
    result = invoke(dataset_tool.cli, 'convert', f'--source={tmp_path / "src"}', f'--dest={dest}', '--transform=center-crop-wide', '--resolution=8x4')
    assert result.exit_code == 0, result.output
    ds = ImageFolderDataset(dest)
    assert len(ds) == 1 # the image narrower than 8 pixels is skipped
    out, _ = ds[0]
    assert out.shape == (3, 8, 8)
    assert (out[:, :2] == 0).all() and (out[:, 6:] == 0).all() and (out[:, 2:6] == 200).all()

def test_center_crop_dhariwal(tmp_path):
    image = np.random.RandomState(0).randint(0, 256, size=[20, 40, 3], dtype=np.uint8)
    save_png(str(tmp_path / 'src' / 'a.png'), image)
    dest = str(tmp_path / 'out.zip')
    result = invoke(dataset_tool.cli, 'convert', f'--source={tmp_path / "src"}', f'--dest={dest}', '--transform=center-crop-dhariwal', '--resolution=8x8')
    assert result.exit_code == 0, result.output
    assert ImageFolderDataset(dest).image_shape == [3, 8, 8]
    result = invoke(dataset_tool.cli, 'convert', f'--source={tmp_path / "src"}', f'--dest={tmp_path / "x.zip"}', '--transform=center-crop-dhariwal', '--resolution=8x4')
    assert result.exit_code != 0 and 'square' in result.output

#----------------------------------------------------------------------------
# Bad inputs.

def test_missing_source(tmp_path):
    result = invoke(dataset_tool.cli, 'convert', f'--source={tmp_path / "nothing"}', f'--dest={tmp_path / "d.zip"}')
    assert result.exit_code != 0 and 'nothing' in result.output

def test_corrupt_image_is_named(tmp_path):
    save_png(str(tmp_path / 'src' / 'good.png'), random_images(1)[0])
    (tmp_path / 'src' / 'bad.png').write_bytes(b'\x89PNG not really')
    result = invoke(dataset_tool.cli, 'convert', f'--source={tmp_path / "src"}', f'--dest={tmp_path / "d.zip"}')
    assert result.exit_code != 0 and 'bad.png' in result.output

def test_failed_convert_leaves_no_zip(tmp_path):
    for name in ['a.png', 'c.png', 'd.png']:
        save_png(str(tmp_path / 'src' / name), random_images(1)[0])
    (tmp_path / 'src' / 'b.png').write_bytes(b'\x89PNG not really') # unreadable, second of four
    dest = tmp_path / 'out' / 'set.zip'
    result = invoke(dataset_tool.cli, 'convert', f'--source={tmp_path / "src"}', f'--dest={dest}')
    assert_clean_error(result, 'b.png')
    assert os.listdir(tmp_path / 'out') == [] # neither set.zip nor a temporary file

    # A ZIP from an earlier run stays as it was.
    os.remove(tmp_path / 'src' / 'b.png')
    assert invoke(dataset_tool.cli, 'convert', f'--source={tmp_path / "src"}', f'--dest={dest}').exit_code == 0
    before = dest.read_bytes()
    (tmp_path / 'src' / 'b.png').write_bytes(b'\x89PNG not really')
    assert_clean_error(invoke(dataset_tool.cli, 'convert', f'--source={tmp_path / "src"}', f'--dest={dest}'), 'b.png')
    assert dest.read_bytes() == before and os.listdir(tmp_path / 'out') == ['set.zip']

def test_folder_dest_has_no_temporary_files(tmp_path):
    dest = tmp_path / 'out'
    assert invoke(dataset_tool.cli, 'convert', '--source=sklearn-digits', f'--dest={dest}', '--max-images=3').exit_code == 0
    written = sorted(os.path.relpath(os.path.join(root, name), dest) for root, _dirs, names in os.walk(dest) for name in names)
    assert written == ['00000/img00000000.png', '00000/img00000001.png', '00000/img00000002.png', 'dataset.json']
    (tmp_path / 'dir.zip').mkdir()
    assert_clean_error(invoke(dataset_tool.cli, 'convert', '--source=sklearn-digits', f'--dest={tmp_path / "dir.zip"}'), 'is a directory')

def test_mixed_sizes_are_named(tmp_path):
    save_png(str(tmp_path / 'src' / 'a.png'), random_images(1)[0])
    save_png(str(tmp_path / 'src' / 'b.png'), random_images(1, size=16)[0])
    result = invoke(dataset_tool.cli, 'convert', f'--source={tmp_path / "src"}', f'--dest={tmp_path / "d.zip"}')
    assert result.exit_code != 0 and 'b.png' in result.output
    save_png(str(tmp_path / 'odd' / 'a.png'), random_images(1, size=6)[0])
    result = invoke(dataset_tool.cli, 'convert', f'--source={tmp_path / "odd"}', f'--dest={tmp_path / "e.zip"}')
    assert result.exit_code != 0 and 'power-of-two' in result.output

def test_bad_options(tmp_path):
    (tmp_path / 'busy').mkdir()
    (tmp_path / 'busy' / 'file.txt').write_text('x')
    result = invoke(dataset_tool.cli, 'convert', '--source=sklearn-digits', f'--dest={tmp_path / "busy"}')
    assert result.exit_code != 0 and 'busy' in result.output
    result = invoke(dataset_tool.cli, 'convert', '--source=sklearn-digits', f'--dest={tmp_path / "d.zip"}', '--resolution=16by16')
    assert result.exit_code != 0 and '16by16' in result.output
    result = invoke(dataset_tool.cli, 'convert', '--source=sklearn-digits', f'--dest={tmp_path / "d.zip"}', '--transform=center-crop')
    assert result.exit_code != 0 and '--resolution' in result.output

#----------------------------------------------------------------------------
# VAE encoding and decoding with the tiny random AutoencoderKL of conftest.py's tiny_vae_dir.

@pytest.mark.slow
def test_encode_with_local_vae(tmp_path, tiny_vae_dir):
    images = random_images(3, size=16)
    for idx, image in enumerate(images):
        save_png(str(tmp_path / 'src' / f'{idx}.png'), image)
    (tmp_path / 'src' / 'dataset.json').write_text(json.dumps({'labels': [[f'{idx}.png', 2 - idx] for idx in range(3)]}))
    dest = str(tmp_path / 'latents.zip')
    run_script('dataset_tool.py', 'encode', f'--model-url={tiny_vae_dir}', f'--source={tmp_path / "src"}', f'--dest={dest}', '--max-images=2')

    with zipfile.ZipFile(dest) as archive:
        assert sorted(archive.namelist()) == ['00000/img-mean-std-00000000.npy', '00000/img-mean-std-00000001.npy', 'dataset.json']
    ds = ImageFolderDataset(dest, use_labels=True)
    assert len(ds) == 2 and ds.image_shape == [8, 2, 2] and ds.resolution == 2
    expected = StabilityVAEEncoder(vae_name=tiny_vae_dir).encode_pixels(torch.from_numpy(images[:2]).permute(0, 3, 1, 2))
    for idx in range(2):
        latents, label = ds[idx]
        assert latents.dtype == np.float32
        np.testing.assert_allclose(latents, expected[idx].numpy(), rtol=1e-5, atol=1e-5)
        assert int(np.argmax(label)) == 2 - idx

def test_decode_round_trip(tmp_path, tiny_vae_dir, single_thread):
    images, latents, decoded = str(tmp_path / 'digits.zip'), str(tmp_path / 'latents.zip'), str(tmp_path / 'decoded')
    for args in [('convert', '--source=sklearn-digits', f'--dest={images}', '--resolution=16x16', '--max-images=3'),
                 ('encode', f'--model-url={tiny_vae_dir}', f'--source={images}', f'--dest={latents}'),
                 ('decode', f'--model-url={tiny_vae_dir}', f'--source={latents}', f'--dest={decoded}')]:
        result = invoke(dataset_tool.cli, *args)
        assert result.exit_code == 0, result.output

    with zipfile.ZipFile(images) as archive:
        source_labels = json.loads(archive.read('dataset.json'))['labels']
    with open(os.path.join(decoded, 'dataset.json')) as f:
        assert json.load(f)['labels'] == source_labels # same names 00000/img0000000i.png, same classes
    ds = ImageFolderDataset(decoded)
    assert len(ds) == 3 and ds.image_shape == [3, 16, 16]

    # The tool decodes the stored mean: the same float32 affine as encode_latents with zero std, then one image per VAE call.
    encoder = StabilityVAEEncoder(vae_name=tiny_vae_dir, batch_size=1)
    mean = torch.stack([torch.from_numpy(latent[:4]) for latent, _label in ImageFolderDataset(latents)])
    scale, bias = (torch.from_numpy(value).reshape(1, -1, 1, 1) for value in (encoder.scale, encoder.bias))
    expected = encoder.decode(mean * scale + bias).numpy()
    for idx in range(3):
        np.testing.assert_array_equal(ds[idx][0], expected[idx])

def assert_clean_error(result, text):
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output # a ClickException, not a traceback
    assert text in result.output, result.output

def test_decode_missing_source(tmp_path, tiny_vae_dir):
    result = invoke(dataset_tool.cli, 'decode', f'--model-url={tiny_vae_dir}', f'--source={tmp_path / "nothing.zip"}', f'--dest={tmp_path / "d.zip"}')
    assert_clean_error(result, 'nothing.zip does not exist')

def test_decode_refuses_an_image_dataset(tmp_path, tiny_vae_dir):
    images = str(tmp_path / 'digits.zip')
    assert invoke(dataset_tool.cli, 'convert', '--source=sklearn-digits', f'--dest={images}', '--max-images=2').exit_code == 0
    result = invoke(dataset_tool.cli, 'decode', f'--model-url={tiny_vae_dir}', f'--source={images}', f'--dest={tmp_path / "d.zip"}')
    assert_clean_error(result, 'holds images (00000/img00000000.png, ...), not VAE latents')

def write_latent_zip(path, shape):
    """A ZIP of one all-zero latent of `shape`, with null labels."""
    return write_zip(path, {**latent_files([np.zeros(shape, dtype=np.float32)]), 'dataset.json': json.dumps({'labels': None})})

def test_decode_wrong_channel_count(tmp_path, tiny_vae_dir):
    source = write_latent_zip(tmp_path / 'latents.zip', [4, 2, 2])
    result = invoke(dataset_tool.cli, 'decode', f'--model-url={tiny_vae_dir}', f'--source={source}', f'--dest={tmp_path / "d.zip"}')
    assert_clean_error(result, 'have shape [4, 2, 2]; expected [8, H/8, W/8]')

def test_decode_missing_vae(tmp_path):
    pytest.importorskip('diffusers')
    source = write_latent_zip(tmp_path / 'latents.zip', [8, 2, 2])
    result = invoke(dataset_tool.cli, 'decode', f'--model-url={tmp_path / "no_vae"}', f'--source={source}', f'--dest={tmp_path / "d.zip"}')
    assert_clean_error(result, 'no_vae does not exist')

#----------------------------------------------------------------------------

#----------------------------------------------------------------------------
# check.

def check_report(result):
    """The lines of a check run without its progress bar."""
    return [line for line in result.output.splitlines() if line.strip() and not line.startswith('check:')]

def test_check_good_dataset(tmp_path):
    dest = str(tmp_path / 'digits.zip')
    assert invoke(dataset_tool.cli, 'convert', '--source=sklearn-digits', f'--dest={dest}', '--resolution=16x16', '--max-images=30').exit_code == 0
    result = invoke(dataset_tool.cli, 'check', f'--source={dest}', '--workers=1')
    assert result.exit_code == 0, result.output
    assert result.stdout == f'{dest}: OK, 30 samples of shape [3, 16, 16] uint8, class labels (label_dim 10)\n'

def test_check_latents_without_labels(tmp_path):
    source = write_latent_zip(tmp_path / 'latents.zip', [8, 3, 3]) # latents need no power-of-two side
    result = invoke(dataset_tool.cli, 'check', f'--source={source}', '--workers=1')
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f'{source}: OK, 1 samples of shape [8, 3, 3] float32, no labels (label_dim 0)'

def bad_dataset(root):
    """Eight 8x8 images, of which one is corrupt, one is 16x16 and one has the label -1."""
    names = [f'00000/img{idx:08d}.png' for idx in range(8)]
    for name, image in zip(names, random_images(8)):
        save_png(str(root / name), image)
    (root / names[2]).write_bytes((root / names[2]).read_bytes()[:60]) # truncated
    save_png(str(root / names[4]), random_images(1, size=16)[0])
    labels = [[name, idx % 3] for idx, name in enumerate(names)]
    labels[6][1] = -1
    (root / 'dataset.json').write_text(json.dumps({'labels': labels}))
    return str(root), names

def test_check_names_every_bad_file(tmp_path):
    source, names = bad_dataset(tmp_path / 'bad')
    result = invoke(dataset_tool.cli, 'check', f'--source={source}', '--workers=1')
    assert result.exit_code == 1, result.output
    report = check_report(result)
    assert report[0] == f'{source}: 3 problems in 8 samples:'
    assert report[1].startswith(f'  {names[2]} cannot be read (OSError: image file is truncated')
    assert report[2] == f'  {names[4]} has shape [3, 16, 16] uint8, but 6 of the 8 samples have [3, 8, 8] uint8; all samples must have one shape'
    assert report[3] == f'  {names[6]} has the label -1, which is negative; class labels are integers >= 0'
    assert len(report) == 4

    # Two worker processes, through the script as users run it, find the same.
    run = run_script('dataset_tool.py', 'check', f'--source={source}', '--workers=2', check=False)
    assert run.returncode == 1, run.stderr
    assert run.stdout == '' and [line for line in run.stderr.splitlines() if line.startswith(('  ', source))] == report

def test_check_lists_at_most_20_problems(tmp_path):
    names = [f'{idx}.png' for idx in range(23)]
    for name in names:
        save_png(str(tmp_path / 'src' / name), random_images(1, size=6)[0]) # not a power of two
    (tmp_path / 'src' / 'dataset.json').write_text(json.dumps({'labels': [[name, 'cat'] for name in names]}))
    result = invoke(dataset_tool.cli, 'check', f'--source={tmp_path / "src"}', '--workers=1')
    assert result.exit_code == 1
    report = check_report(result)
    assert report[0].endswith(': 24 problems in 23 samples:') and len(report) == 22
    assert report[1] == '  0.png has the label "cat", which is a string, not a class index (an integer >= 0) or a list of numbers'
    assert '  0.png is 6x6 (the size of 23 of the 23 samples); images must have a power-of-two side' in report
    assert report[-1] == '  ... and 4 more'

def test_check_unusable_source_or_dataset_json(tmp_path):
    assert_clean_error(invoke(dataset_tool.cli, 'check', f'--source={tmp_path / "none.zip"}'), 'none.zip does not exist')
    save_png(str(tmp_path / 'src' / 'a.png'), random_images(1)[0])
    (tmp_path / 'src' / 'dataset.json').write_text('{"labels": [["a.png", 0]')
    result = invoke(dataset_tool.cli, 'check', f'--source={tmp_path / "src"}', '--workers=1')
    assert result.exit_code == 1 and check_report(result)[1].startswith('  dataset.json cannot be used:')
