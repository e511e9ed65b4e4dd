"""Tests for zero-shot editing (training/editing.py, edit_images.py): the operators, the exactness of the known
part, agreement with generate_images, interpolation endpoints, the command line, and (slow) edits of digits
by a trained tiny student that beat simple baselines."""

import os

import numpy as np
import PIL.Image
import pytest
import torch

import edit_images
import generate_images
from helpers import (assert_user_error, image_set, invoke, make_digits_zip, network_pickle, png_bytes, random_images,
    run_script, save_pickle, tiny_precond, torchrun, write_dataset)
from training import editing

pytestmark = pytest.mark.usefixtures('single_thread')

CD = dict(S=3, sigma_min=0.002, sigma_max=80.0, rho=7.0)

#----------------------------------------------------------------------------
# Helpers.

def reference_images(count=4, size=8, seed=0):
    """Random images as the network sees them: uint8 pixels mapped to [-1, 1]."""
    pixels = torch.as_tensor(random_images(count, size, seed=seed)).permute(0, 3, 1, 2)
    return pixels.to(torch.float32) / 127.5 - 1


def block_means(x, factor):
    return torch.nn.functional.avg_pool2d(x.double(), factor)


def luminance(x):
    return torch.einsum('c,nchw->nhw', torch.tensor(editing.LUMINANCE, dtype=torch.float64), x.double())


def box_hole(size=8, box=(2, 1, 6, 5)):
    x0, y0, x1, y1 = box
    hole = torch.zeros([1, 1, size, size], dtype=torch.bool)
    hole[..., y0:y1, x0:x1] = True
    return hole


def sample_edit(sampler, operator, reference, seed=0, **kwargs):
    net = tiny_precond(frozen=True)
    noise = torch.randn(reference.shape, generator=torch.Generator().manual_seed(seed))
    randn = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        return editing.edit(sampler, net, noise, operator, reference,
                            randn_like=lambda x: torch.randn(x.shape, generator=randn, dtype=x.dtype), **kwargs)


SAMPLERS = {'student': (generate_images.stochastic_consistency_sampler, dict(num_steps=3)),
            'heun': (generate_images.edm_sampler, dict(num_steps=3))}


def read_png(path):
    return np.asarray(PIL.Image.open(path)).transpose(2, 0, 1)


def write_source(root, images, classes=None):
    files, labels = image_set(images, classes)
    return write_dataset(root, files, labels, as_zip=True)

#----------------------------------------------------------------------------
# Operators.

def test_transforms_are_orthogonal_with_the_paper_first_rows():
    u = torch.tensor(editing.LUMINANCE, dtype=torch.float64)
    colour = editing.Colorization().matrix
    assert torch.allclose(colour @ colour.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(colour[0], u / u.norm(), atol=1e-12)
    blocks = editing.superresolution(3).matrix
    assert torch.allclose(blocks @ blocks.T, torch.eye(9, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(blocks[0], torch.full([9], 1 / 3, dtype=torch.float64), atol=1e-12)


def test_replacement_and_degraded_inputs():
    x, y = reference_images(seed=1), reference_images(seed=2)
    hole = box_hole()
    replaced = editing.inpainting(hole).replace(x, y)
    assert torch.equal(replaced[:, :, ~hole[0, 0]], y[:, :, ~hole[0, 0]]) and torch.equal(replaced[:, :, hole[0, 0]], x[:, :, hole[0, 0]])
    assert torch.equal(editing.inpainting(hole).degraded(y)[:, :, hole[0, 0]], torch.zeros(4, 3, 16))

    colour = editing.Colorization()
    replaced = colour.replace(x, y)
    assert torch.allclose(luminance(replaced), luminance(y), atol=1e-6)
    # The colour coefficients (orthogonal to the luminance direction) are x's.
    assert torch.allclose(colour.coefficients(replaced)[:, :, 1:], colour.coefficients(x)[:, :, 1:], atol=1e-6)
    grey = colour.degraded(y)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 0], grey[:, 2])
    assert torch.allclose(luminance(grey), luminance(y), atol=1e-6)

    superres = editing.superresolution(4)
    replaced = superres.replace(x, y)
    assert torch.allclose(block_means(replaced, 4), block_means(y, 4), atol=1e-6)
    assert torch.allclose(replaced - block_means(replaced, 4).repeat_interleave(4, 2).repeat_interleave(4, 3),
                          x - block_means(x, 4).repeat_interleave(4, 2).repeat_interleave(4, 3), atol=1e-6)
    flat = superres.degraded(y)
    assert torch.allclose(flat.double(), block_means(y, 4).repeat_interleave(4, 2).repeat_interleave(4, 3), atol=1e-6)


def test_latent_hole_marks_every_cell_that_touches_the_hole():
    hole = box_hole(16, (3, 0, 9, 4))
    cells = editing.latent_hole(hole, 4)
    assert cells.shape == (1, 1, 4, 4)
    assert cells[0, 0].nonzero().tolist() == [[0, 0], [0, 1], [0, 2]]

#----------------------------------------------------------------------------
# Sampling with the replacing denoiser.

@pytest.mark.parametrize('sampler', sorted(SAMPLERS))
def test_known_part_of_an_edit_is_the_reference(sampler):
    sampler_fn, kwargs = SAMPLERS[sampler]
    y = reference_images(seed=3)
    hole = box_hole()
    result = sample_edit(sampler_fn, editing.inpainting(hole), y, **kwargs)
    assert torch.allclose(result[:, :, ~hole[0, 0]], y[:, :, ~hole[0, 0]], rtol=0, atol=1e-6)
    assert (result[:, :, hole[0, 0]] - y[:, :, hole[0, 0]]).abs().max() > 0.05  # the hole is generated, not copied

    result = sample_edit(sampler_fn, editing.Colorization(), y, **kwargs)
    assert torch.allclose(luminance(result), luminance(y), rtol=0, atol=1e-5)
    assert (result - y).abs().max() > 0.05

    for factor in (2, 4):
        result = sample_edit(sampler_fn, editing.superresolution(factor), y, **kwargs)
        assert torch.allclose(block_means(result, factor), block_means(y, factor), rtol=0, atol=1e-5)
        assert (result - y).abs().max() > 0.05


@pytest.mark.parametrize('sampler', sorted(SAMPLERS))
def test_known_part_stays_exact_with_reconstruction_guidance_and_resampling(sampler):
    sampler_fn, kwargs = SAMPLERS[sampler]
    y, hole = reference_images(seed=6), box_hole()
    plain = sample_edit(sampler_fn, editing.inpainting(hole), y, **kwargs)
    for options in [dict(guidance=4.0), dict(resample=3), dict(guidance=4.0, resample=2)]:
        result = sample_edit(sampler_fn, editing.inpainting(hole), y, **kwargs, **options)
        assert torch.allclose(result[:, :, ~hole[0, 0]], y[:, :, ~hole[0, 0]], rtol=0, atol=1e-6)
        assert (result - plain)[:, :, hole[0, 0]].abs().max() > 1e-3, options  # the options change the filled part


def linear_denoiser(size=8, seed=0):
    """D(x) = M x over all C*H*W values (float64), a denoiser that mixes every pixel with every other, and M."""
    n = 3 * size * size
    matrix = torch.randn([n, n], generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / n ** 0.5
    return (lambda x, sigma, class_labels=None: (x.flatten(1) @ matrix.T).reshape(x.shape)), matrix


def test_reconstruction_guidance_is_the_gradient_step_of_ho_et_al():
    # D~ = M x - (w/2) grad_x |k (M x - y)|^2 = M x - w M^T (k (M x - y)), then the known part replaced by y.
    net, matrix = linear_denoiser()
    y, hole = reference_images(seed=7).double(), box_hole()
    x = torch.randn(y.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    known = (~hole).double().expand_as(y)
    residual = (known * (net(x, 1.0) - y)).flatten(1)
    expected = net(x, 1.0) - 2.5 * (residual @ matrix).reshape(y.shape)
    expected = torch.where(known.bool(), y, expected)
    with torch.no_grad():  # as edit_images calls it: the guidance takes its own gradient
        result = editing.replacing_denoiser(net, editing.inpainting(hole), y, guidance=2.5)(x, 1.0)
    assert torch.allclose(result, expected, rtol=0, atol=1e-12)
    plain = editing.replacing_denoiser(net, editing.inpainting(hole), y)(x, 1.0)
    assert (result - plain).abs().max() > 0.1


def test_resampling_renoises_the_replaced_estimate_at_the_same_sigma():
    net, _matrix = linear_denoiser(seed=1)
    y, hole, sigma = reference_images(seed=9).double(), box_hole(), 0.7
    operator = editing.inpainting(hole)
    x = torch.randn(y.shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    draws = torch.randn([2, *y.shape], generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    expected = operator.replace(net(x, sigma), y)
    for z in draws:  # Lugmayr et al. 2022: x <- D'(x) + sigma z, denoised again at the same level
        expected = operator.replace(net(expected + sigma * z, sigma), y)
    queue = list(draws)
    result = editing.replacing_denoiser(net, operator, y, resample=3, randn_like=lambda t: queue.pop(0))(x, sigma)
    assert not queue and torch.equal(result, expected)


def test_every_denoiser_call_sees_the_replaced_estimate():
    # Heun's state keeps the reference's known part plus the initial noise at every level: after the
    # first step of a 2-step Heun edit the known pixels are y + sigma_1 * z exactly (up to float error).
    y, hole = reference_images(seed=4).double(), box_hole()  # float64: the Heun slope at sigma_1 = 0.002 amplifies rounding
    seen = []

    def net(x, sigma, class_labels=None):
        seen.append((float(sigma), x.clone()))
        return torch.zeros_like(x)
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    editing.edit(generate_images.edm_sampler, net, noise, editing.inpainting(hole), y, num_steps=2, dtype=torch.float64)
    sigma, x = seen[2]  # calls: (x0, 80), (Euler guess, s1), (x1, s1)
    known = ~hole[0, 0]
    assert torch.allclose(x[:, :, known], (y + sigma * noise)[:, :, known], rtol=0, atol=1e-8)


def test_an_edit_with_nothing_known_is_the_plain_sample(tmp_path):
    """With the whole image in the hole, editing draws exactly generate_images' noise, labels and fresh noise."""
    net = tiny_precond(label_dim=4, frozen=True)
    student = save_pickle(network_pickle(net, cd=CD), tmp_path / 'student.pkl')
    teacher = save_pickle(network_pickle(net), tmp_path / 'teacher.pkl')
    source = write_source(tmp_path / 'src', random_images(5, 8))
    seeds = [3, 11, 4]
    for path, sampler, kwargs in [(student, 'stochastic', {}), (teacher, 'heun', dict(num_steps=3))]:
        edited = [r for r in edit_images.edit_images(path, source, 'inpaint', box=(0, 0, 8, 8), seeds=seeds, max_batch_size=2,
                                                     verbose=False, device='cpu', **kwargs)]
        plain = list(generate_images.generate_images(path, seeds=seeds, max_batch_size=2, sampler_fn=sampler,
                                                     verbose=False, device='cpu', **kwargs))
        assert torch.equal(torch.cat([r.images for r in edited]), torch.cat([r.images for r in plain]))
        assert torch.equal(torch.cat([r.labels for r in edited]), torch.cat([r.labels for r in plain]))


def test_edit_images_uint8_results_keep_the_known_pixels(tmp_path):
    images = random_images(6, 8, seed=7)
    source = write_source(tmp_path / 'src', images, classes=[0, 1, 2, 0, 1, 2])  # 3 of the network's 4 classes
    student = save_pickle(network_pickle(tiny_precond(label_dim=4, frozen=True), cd=CD), tmp_path / 'student.pkl')
    box = (0, 0, 8, 4)
    results = list(edit_images.edit_images(student, source, 'inpaint', box=box, seeds=[7, 2], outdir=str(tmp_path / 'out'),
                                           verbose=False, device='cpu'))
    r, = results
    expected_source = images[[7 % 6, 2]].transpose(0, 3, 1, 2)
    assert np.array_equal(r.source.numpy(), expected_source)
    assert np.array_equal(r.images.numpy()[:, :, 4:], expected_source[:, :, 4:])  # the known rows, exactly
    assert not np.array_equal(r.images.numpy()[:, :, :4], expected_source[:, :, :4])
    assert np.all(r.degraded.numpy()[:, :, :4] == 128) and np.array_equal(r.degraded.numpy()[:, :, 4:], expected_source[:, :, 4:])
    assert torch.equal(r.labels, torch.eye(4)[[1, 2]])  # the source's labels
    assert np.array_equal(read_png(tmp_path / 'out' / '000007.png'), r.images[0].numpy())
    fixed, = edit_images.edit_images(student, source, 'inpaint', box=box, seeds=[7, 2], class_idx=3, verbose=False, device='cpu')
    assert torch.equal(fixed.labels, torch.eye(4)[[3, 3]])
    # Reconstruction guidance and resampling: the known rows stay exact, and an image still depends on its seed only.
    harmonised, = edit_images.edit_images(student, source, 'inpaint', box=box, seeds=[7, 2], reconstruction=4, resample=2,
                                          verbose=False, device='cpu')
    alone, = edit_images.edit_images(student, source, 'inpaint', box=box, seeds=[2], reconstruction=4, resample=2,
                                     verbose=False, device='cpu')
    assert np.array_equal(harmonised.images.numpy()[:, :, 4:], expected_source[:, :, 4:])
    assert not np.array_equal(harmonised.images.numpy(), r.images.numpy())
    assert torch.equal(alone.images[0], harmonised.images[1])

#----------------------------------------------------------------------------
# Interpolation.

def test_slerp_endpoints_and_norm():
    gen = torch.Generator().manual_seed(8)
    z0, z1 = torch.randn([3, 3, 8, 8], generator=gen), torch.randn([3, 3, 8, 8], generator=gen)
    assert torch.equal(editing.slerp(z0, z1, [0, 0, 0]), z0) and torch.equal(editing.slerp(z0, z1, [1, 1, 1]), z1)
    middle = editing.slerp(z0, z1, [0.5] * 3)
    # On the great circle: the norm stays near that of the ends (a straight line would shrink it by about 1/sqrt(2)).
    ratio = middle.flatten(1).norm(dim=1) / z0.flatten(1).norm(dim=1)
    assert ((ratio > 0.9) & (ratio < 1.1)).all()
    assert torch.allclose(editing.slerp(z0, z0, [0.3] * 3), z0, atol=1e-6)


@pytest.mark.parametrize('kind', ['student', 'teacher'])
def test_interpolation_endpoints_are_the_seeds_samples(tmp_path, kind):
    net = tiny_precond(label_dim=4, frozen=True)
    path = save_pickle(network_pickle(net, cd=CD if kind == 'student' else None), tmp_path / 'net.pkl')
    kwargs = {} if kind == 'student' else dict(num_steps=3)
    seeds = [5, 9, 1, 2]
    results = list(edit_images.interpolate_images(path, seeds, num_frames=4, max_batch_size=3, outdir=str(tmp_path / 'out'),
                                                  verbose=False, device='cpu', **kwargs))
    frames = {frame: image for r in results for frame, image in zip(r.frames, r.images.numpy())}
    assert list(frames) == [(a, b, k) for a, b in [(5, 9), (1, 2)] for k in range(4)]
    plain = {seed: image for r in generate_images.generate_images(path, seeds=seeds, verbose=False, device='cpu', **kwargs)
             for seed, image in zip(r.seeds, r.images.numpy())}
    # Other batch layouts may pick other CPU kernels: a pixel that rounds at x.5 can then differ by one level.
    same = lambda x, y: np.abs(x.astype(int) - y).max() <= 1
    for a, b in [(5, 9), (1, 2)]:
        assert same(frames[a, b, 0], plain[a]) and same(frames[a, b, 3], plain[b])
        assert not same(frames[a, b, 1], plain[a]) and not same(frames[a, b, 1], plain[b])
    assert same(read_png(tmp_path / 'out' / '000001-000002-03.png'), plain[2])

#----------------------------------------------------------------------------
# Command line.

@pytest.fixture(scope='module')
def pickles(tmp_path_factory):
    root = tmp_path_factory.mktemp('edit_nets')
    return dict(student=save_pickle(network_pickle(tiny_precond(frozen=True), cd=CD), root / 'student.pkl'),
                teacher=save_pickle(network_pickle(tiny_precond(seed=1, frozen=True)), root / 'teacher.pkl'),
                source=write_source(root / 'src', random_images(4, 8, seed=9)))


def test_cli_writes_pngs_and_grid(tmp_path, pickles):
    outdir, grid = tmp_path / 'out', tmp_path / 'grid.png'
    run_script('edit_images.py', f'--net={pickles["student"]}', '--edit=inpaint', f'--source={pickles["source"]}',
               '--box=4,0,8,8', f'--outdir={outdir}', '--seeds=0-4', '--batch=2', f'--grid={grid}',
               f'--compare={pickles["teacher"]}', '--steps=2')
    assert sorted(os.listdir(outdir)) == [f'{seed:06d}.png' for seed in range(5)] + ['compare']
    assert sorted(os.listdir(outdir / 'compare')) == [f'{seed:06d}.png' for seed in range(5)]
    image = read_png(grid)
    assert image.shape == (3, 4 * 8, 5 * 8)  # source, degraded, student, teacher; 5 seeds
    assert np.array_equal(image[:, 16:24, 8:16], read_png(outdir / '000001.png'))
    assert np.array_equal(image[:, 24:32, 32:40], read_png(outdir / 'compare' / '000004.png'))
    assert np.array_equal(image[:, 0:8, 32:40], image[:, 0:8, 0:8])  # seed 4 edits image 4 mod 4 = 0


@pytest.mark.slow
def test_torchrun_splits_seeds_across_ranks(tmp_path, pickles):
    outdir, grid = tmp_path / 'out', tmp_path / 'grid.png'
    run_script('edit_images.py', f'--net={pickles["student"]}', '--edit=superres', f'--source={pickles["source"]}',
               f'--outdir={outdir}', '--seeds=0-4', '--batch=2', f'--grid={grid}', launcher=torchrun())
    single = list(edit_images.edit_images(pickles['student'], pickles['source'], 'superres', seeds=range(5), verbose=False,
                                          device='cpu'))
    expected = torch.cat([r.images for r in single]).numpy()
    for seed in range(5):
        assert np.array_equal(read_png(outdir / f'{seed:06d}.png'), expected[seed])
    assert np.array_equal(read_png(grid)[:, 16:24], np.concatenate(list(expected), axis=2))


def test_cli_interpolation_grid(tmp_path, pickles, no_process_group):
    result = invoke(edit_images.cmdline, f'--net={pickles["student"]}', '--edit=interpolate', f'--outdir={tmp_path}/out',
                    '--seeds=0-3', '--frames=3', f'--grid={tmp_path}/grid.png')
    assert result.exit_code == 0, result.output
    assert len(os.listdir(tmp_path / 'out')) == 6
    assert read_png(tmp_path / 'grid.png').shape == (3, 2 * 8, 3 * 8)


def test_cli_bad_options_are_one_line(tmp_path, pickles, no_process_group):
    student, teacher, source = pickles['student'], pickles['teacher'], pickles['source']
    out = f'--outdir={tmp_path}/out'
    (tmp_path / 'mask.png').write_bytes(png_bytes(np.zeros([4, 4], dtype=np.uint8)))
    other = write_source(tmp_path / 'src16', random_images(2, 16))
    cases = [
        (['--edit=inpaint', f'--source={source}'], ['--mask', '--box'], 1),
        (['--edit=inpaint', f'--source={source}', '--box=4,0,9,8'], ['--box=4,0,9,8'], 1),
        (['--edit=inpaint', f'--source={source}', '--box=1,2,3'], ['--box', 'four integers'], 2),
        (['--edit=inpaint', f'--source={source}', f'--mask={tmp_path}/mask.png'], ['--mask', '4x4', '8x8'], 1),
        (['--edit=inpaint', f'--source={source}', f'--mask={tmp_path}/missing.png'], ['--mask', 'cannot read'], 1),
        (['--edit=superres'], ['--source'], 2),
        (['--edit=superres', f'--source={source}', '--factor=3'], ['--factor=3', 'divide'], 1),
        (['--edit=colorize', f'--source={source}', '--factor=2'], ['--factor', 'superres'], 2),
        (['--edit=colorize', f'--source={other}'], ['--source', '16x16', '[3, 8, 8]'], 1),
        (['--edit=colorize', f'--source={tmp_path}/nothing.zip'], ['--source', 'does not exist'], 1),
        (['--edit=colorize', f'--source={source}', '--class=2'], ['--class=2', '0 classes'], 1),
        (['--edit=interpolate', '--seeds=0-2'], ['--seeds', 'pairs', '3 seeds'], 1),
        (['--edit=interpolate', f'--source={source}'], ['--source', 'not used'], 2),
        (['--edit=interpolate', '--reconstruction=4'], ['--reconstruction', 'not used'], 2),
        (['--edit=inpaint', f'--source={source}', '--box=0,0,4,4', '--reconstruction=-1'], ['--reconstruction'], 2),
        (['--edit=inpaint', f'--source={source}', '--box=0,0,4,4', '--resample=0'], ['--resample'], 2),
    ]
    for args, fragments, code in cases:
        assert_user_error(invoke(edit_images.cmdline, f'--net={student}', out, *args), *fragments, exit_code=code)
    result = invoke(edit_images.cmdline, f'--net={teacher}', out, '--edit=colorize', f'--source={source}', '--sampler=student')
    assert_user_error(result, '--sampler=student', 'consistency student')
    assert not os.path.exists(tmp_path / 'out')


def test_latent_models_refuse_pixel_edits_and_inpaint_latents(tmp_path, tiny_vae_dir, no_process_group):
    from training.encoders import StabilityVAEEncoder
    from training.networks_edm2 import Precond
    torch.manual_seed(0)
    net = Precond(img_resolution=4, img_channels=4, label_dim=0, use_fp16=False, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                  attn_resolutions=[]).eval().requires_grad_(False)
    data = network_pickle(net, cd=CD)
    data.encoder = StabilityVAEEncoder(vae_name=tiny_vae_dir)
    student = save_pickle(data, tmp_path / 'latent.pkl')
    source = write_source(tmp_path / 'src', random_images(2, 32))
    for edit in ('colorize', 'superres'):
        result = invoke(edit_images.cmdline, f'--net={student}', f'--edit={edit}', f'--source={source}', f'--outdir={tmp_path}/out')
        assert_user_error(result, f'--edit={edit}', 'pixel-space', 'StabilityVAEEncoder')
    r, = edit_images.edit_images(student, source, 'inpaint', box=(0, 0, 32, 8), seeds=[0, 1], verbose=False, device='cpu')
    assert r.images.shape == (2, 3, 32, 32) and r.images.dtype == torch.uint8
    assert np.all(r.degraded.numpy()[:, :, :8] == 128)

#----------------------------------------------------------------------------
# A trained tiny student on the digits (slow): edits that beat simple baselines.

@pytest.fixture(scope='module')
def digit_student(tmp_path_factory):
    """An unconditional tiny teacher (32Ki digits) and its 4-step student (4Ki), trained by train_edm2.py (about 4 minutes)."""
    root = tmp_path_factory.mktemp('digit_edits')
    data = make_digits_zip(root / 'digits-16.zip')
    common = [f'--data={data}', '--cond=False', '--status=2Ki', '--seed=0']
    run_script('train_edm2.py', f'--outdir={root}/teacher', *common, '--preset=tiny-img16', '--duration=32Ki',
               '--snapshot=32Ki', '--checkpoint=32Ki')
    teacher = f'{root}/teacher/network-snapshot-0000032-0.100.pkl'
    run_script('train_edm2.py', f'--outdir={root}/student', *common, '--preset=cd-tiny-img16', f'--teacher={teacher}',
               '--T_start=16', '--T_end=16', '--T_anneal_kimg=0', '--duration=4Ki', '--snapshot=4Ki', '--checkpoint=4Ki')
    return data, f'{root}/student/network-snapshot-0000004-0.100.pkl'


def edited(student, data, edit, num, **kwargs):
    return torch.cat([r.images for r in edit_images.edit_images(student, data, edit, seeds=range(num), max_batch_size=100,
                                                               verbose=False, device='cpu', **kwargs)]).numpy()


def first_digits(data, num=200):
    """The first `num` digits, their classes, and a digit classifier and mean image made from the other digits."""
    import quickstart
    from training import digit_features
    images, labels, _ = quickstart.load_labelled_images(data)
    classifier = digit_features.train_digit_classifier(images[num:], labels[num:], num_classes=10, epochs=5)
    agreement = lambda x: quickstart.class_agreement(quickstart.class_probabilities(classifier, x), labels[:num])
    return images[:num], agreement, images[num:].mean(axis=0)


RECONSTRUCTION, RESAMPLE = 32, 12  # the best of w = 8, 16, 32, 64 and R = 6, 12, 24 on these digits (docs/editing.md)
HALVES = dict(bottom=(0, 8, 16, 16), right=(8, 0, 16, 16))  # --box of each hole


@pytest.fixture(scope='module')
def inpainting_scores(digit_student):
    """Class agreement of the first 400 digits with each half inpainted by the student (plain Alg. 4, and with
    reconstruction guidance and resampling) or filled with uniform noise or the mean image."""
    data, student = digit_student
    originals, agreement, mean_image = first_digits(data, num=400)
    scores = {}
    for half, (x0, y0, x1, y1) in HALVES.items():
        plain = edited(student, data, 'inpaint', len(originals), box=(x0, y0, x1, y1))
        harmonised = edited(student, data, 'inpaint', len(originals), box=(x0, y0, x1, y1),
                            reconstruction=RECONSTRUCTION, resample=RESAMPLE)
        noise_fill, mean_fill = originals.copy(), originals.copy()
        noise_fill[:, :, y0:y1, x0:x1] = np.random.RandomState(0).randint(0, 256, size=noise_fill[:, :, y0:y1, x0:x1].shape)
        mean_fill[:, :, y0:y1, x0:x1] = np.round(mean_image[:, y0:y1, x0:x1]).astype(np.uint8)
        scores[half] = dict(harmonised=agreement(harmonised), plain=agreement(plain), noise=agreement(noise_fill),
                            mean=agreement(mean_fill), original=agreement(originals))
        print(f'inpainting ({half} half) class agreement: {scores[half]}')
    return scores


@pytest.mark.slow
def test_reconstruction_guidance_and_resampling_improve_student_inpainting(inpainting_scores):
    gains = [s['harmonised'] - s['plain'] for s in inpainting_scores.values()]
    assert np.mean(gains) > 0.05 and min(gains) > 0


@pytest.mark.slow
def test_student_inpainting_of_digits_beats_noise_and_mean_fills(inpainting_scores):
    for scores in inpainting_scores.values():
        assert scores['harmonised'] > max(scores['noise'], scores['mean']) + 0.05


@pytest.mark.slow
def test_student_superresolution_of_digits_beats_bicubic(digit_student):
    data, student = digit_student
    originals, _agreement, _mean_image = first_digits(data)
    num = len(originals)
    superres = edited(student, data, 'superres', num, factor=2).astype(np.float64)
    small = originals.reshape(num, 3, 8, 2, 8, 2).astype(np.float64).mean(axis=(3, 5))
    bicubic = torch.nn.functional.interpolate(torch.as_tensor(small), scale_factor=2, mode='bicubic').clamp(0, 255).numpy()
    errors = {name: float(np.sqrt(((x - originals) ** 2).mean())) for name, x in [('student', superres), ('bicubic', bicubic),
              ('nearest', small.repeat(2, axis=2).repeat(2, axis=3))]}
    print(f'super-resolution RMSE (0-255): {errors}')
    assert errors['student'] < errors['bicubic']

#----------------------------------------------------------------------------
