"""Tests for generate_images.py: samplers against analytic answers, per-seed RNG, the CLI, CD students."""

import inspect
import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch

import generate_images
from helpers import (GaussianDenoiser, assert_user_error, error_line, invoke, load_fixture, network_pickle, run_script,
    save_pickle, tiny_precond, torchrun)

#----------------------------------------------------------------------------
# Analytic denoisers. For data y ~ N(mu, s^2) per pixel, helpers.GaussianDenoiser(mu, s) is exact, and the
# probability-flow ODE moves x along x(sigma) - mu = (x(sigma_a) - mu) sqrt(s^2+sigma^2)/sqrt(s^2+sigma_a^2).

def ode_endpoint(x, sigma, mu, s):
    """Where the exact ODE trajectory through x at noise level sigma ends at sigma = 0."""
    return mu + (x - mu) * s / np.sqrt(s ** 2 + sigma ** 2)


def karras_nodes(n, sigma_min, sigma_max, rho):
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + np.arange(n) / max(n - 1, 1) * (b - a)) ** rho


def ideal_student(mu, s, nodes):
    """A perfect multistep consistency student for the Gaussian data: from x at sigma it predicts the x_hat
    whose DDIM step to the next student node lands exactly on the ODE trajectory."""
    boundaries = list(nodes[1:]) + [0.0]

    def predict(x, sigma, labels=None):
        sigma = float(sigma)
        bdry = next(b for b in boundaries if b < sigma * (1 - 1e-6))
        x_target = mu + (x - mu) * np.sqrt(s ** 2 + bdry ** 2) / np.sqrt(s ** 2 + sigma ** 2)
        return (sigma * x_target - bdry * x) / (sigma - bdry)
    return predict


class CallLog:
    """Wraps a denoiser function and records the sigma of every call."""

    def __init__(self, fn):
        self.fn = fn
        self.sigmas = []

    def __call__(self, x, sigma, labels=None):
        self.sigmas.append(float(sigma))
        return self.fn(x, sigma, labels)

#----------------------------------------------------------------------------
# Samplers.

def test_heun_reaches_gaussian_ode_solution():
    mu, s = 0.3, 0.5
    noise = torch.randn([64, 1, 2, 2], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    net = CallLog(GaussianDenoiser(mu, s))
    out = generate_images.edm_sampler(net, noise, num_steps=128, dtype=torch.float64)
    expected = ode_endpoint(noise * 80, 80, mu, s)
    assert torch.allclose(out, expected, rtol=0, atol=2e-3)
    assert len(net.sigmas) == 2 * 128 - 1
    assert net.sigmas[0] == pytest.approx(80) and min(net.sigmas) == pytest.approx(0.002)
    # Heun is 2nd order: halving the step count roughly quadruples the error.
    error_64 = (generate_images.edm_sampler(GaussianDenoiser(mu, s), noise, num_steps=64, dtype=torch.float64) - expected).abs().max()
    error_32 = (generate_images.edm_sampler(GaussianDenoiser(mu, s), noise, num_steps=32, dtype=torch.float64) - expected).abs().max()
    assert 3 < error_32 / error_64 < 5


def test_heun_guidance_follows_interpolated_denoiser():
    s, mu_cond, mu_guide, w = 0.5, 0.4, -0.2, 2.5
    noise = torch.randn([32, 1, 2, 2], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    net, gnet = CallLog(GaussianDenoiser(mu_cond, s)), CallLog(GaussianDenoiser(mu_guide, s))
    out = generate_images.edm_sampler(net, noise, gnet=gnet, guidance=w, num_steps=128, dtype=torch.float64)
    # Both denoisers share s, so the guided one is the Gaussian denoiser with mean lerp(mu_guide, mu_cond, w).
    expected = ode_endpoint(noise * 80, 80, mu_guide + w * (mu_cond - mu_guide), s)
    assert torch.allclose(out, expected, rtol=0, atol=2e-3)
    assert len(net.sigmas) == len(gnet.sigmas) == 2 * 128 - 1


def counted_randn_like(generator):
    """A randn_like drawing from `generator`, and the list it appends to on every draw."""
    draws = []

    def randn_like(x):
        draws.append(1)
        return torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return draws, randn_like


def test_heun_churn_keeps_the_data_distribution():
    mu, s = 1.0, 0.5
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn([20000, 1, 1, 1], generator=gen, dtype=torch.float64)
    draws, randn_like = counted_randn_like(gen)
    out = generate_images.edm_sampler(GaussianDenoiser(mu, s), noise, num_steps=128, S_churn=40, S_min=0.05, S_max=50,
                                      dtype=torch.float64, randn_like=randn_like)
    sigmas = karras_nodes(128, 0.002, 80, 7)
    assert len(draws) == int(((sigmas >= 0.05) & (sigmas <= 50)).sum())
    assert abs(out.mean().item() - mu) < 0.015
    assert abs(out.std().item() - s) < 0.01
    # Churn changes individual samples compared with the deterministic ODE.
    assert (out - ode_endpoint(noise * 80, 80, mu, s)).abs().max() > 0.1


def test_consistency_sampler_is_exact_for_an_ideal_student():
    mu, s, S = -0.1, 0.5, 8
    nodes = load_fixture('student_grids')['S8_nodes']
    noise = torch.randn([16, 2, 2, 2], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    net = CallLog(ideal_student(mu, s, nodes))
    out = generate_images.consistency_sampler(net, noise, num_steps=S, dtype=torch.float64)
    assert torch.allclose(out, ode_endpoint(noise * 80, 80, mu, s), rtol=0, atol=1e-10)
    assert net.sigmas == list(nodes)  # one network call per student node, on the training grid


def test_consistency_sampler_grid_is_float64_karras_cast_to_dtype():
    nodes = load_fixture('student_grids')['S5_sigma_min0p01_sigma_max10_rho3_nodes']
    net = CallLog(lambda x, sigma, labels: torch.zeros_like(x))
    generate_images.consistency_sampler(net, torch.zeros([1, 1, 1, 1]), num_steps=5, sigma_min=0.01, sigma_max=10, rho=3)
    assert net.sigmas == [float(np.float32(v)) for v in nodes]


def test_consistency_sampler_point_mass_and_last_step_returns_prediction():
    c = 0.7
    noise = torch.randn([4, 3, 2, 2], generator=torch.Generator().manual_seed(5))
    for sampler in (generate_images.consistency_sampler, generate_images.stochastic_consistency_sampler):
        net = CallLog(lambda x, sigma, labels: torch.full_like(x, c))
        out = sampler(net, noise, num_steps=4)
        assert torch.equal(out, torch.full_like(noise, c))
        assert len(net.sigmas) == 4


def test_stochastic_consistency_sampler_samples_the_data_distribution():
    mu, s = 0.5, 0.3
    gen = torch.Generator().manual_seed(6)
    noise = torch.randn([20000, 1, 1, 1], generator=gen, dtype=torch.float64)
    draws, randn_like = counted_randn_like(gen)

    def endpoint_net(x, sigma, labels=None):
        return ode_endpoint(x, float(sigma), mu, s)
    out = generate_images.stochastic_consistency_sampler(endpoint_net, noise, num_steps=4, dtype=torch.float64,
                                                         randn_like=randn_like)
    assert len(draws) == 3  # fresh noise before every step but the first
    assert abs(out.mean().item() - mu) < 0.01 and abs(out.std().item() - s) < 0.01
    deterministic = generate_images.consistency_sampler(endpoint_net, noise, num_steps=4, dtype=torch.float64)
    assert (out - deterministic).abs().max() > 0.1

#----------------------------------------------------------------------------
# Tiny EDM2 networks (helpers.tiny_precond, frozen as a loaded pickle) and pickles.

def read_png(path):
    return np.asarray(PIL.Image.open(path)).transpose(2, 0, 1)


class CountingNet(torch.nn.Module):
    """Denoiser wrapper that counts its calls in a class-level log (survives pickling within one process)."""
    log = []

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.img_channels, self.img_resolution, self.label_dim = inner.img_channels, inner.img_resolution, inner.label_dim

    def forward(self, x, sigma, class_labels=None):
        CountingNet.log.append(float(sigma))
        return self.inner(x, sigma, class_labels)


def collect(**kwargs):
    return {seed: image for r in generate_images.generate_images(verbose=False, device='cpu', **kwargs)
            for seed, image in zip(r.seeds, r.images.numpy())}


def test_images_depend_only_on_their_seed():
    net = tiny_precond(label_dim=4, frozen=True)
    seeds = [3, 1, 4, 15]
    whole = collect(net=net, seeds=seeds, max_batch_size=4, num_steps=2)
    split = collect(net=net, seeds=seeds[::-1], max_batch_size=2, num_steps=2)
    assert sorted(whole) == sorted(seeds)
    for seed in seeds:
        assert whole[seed].dtype == np.uint8 and whole[seed].shape == (3, 8, 8)
        assert np.array_equal(whole[seed], split[seed])
    assert not np.array_equal(whole[3], whole[1])
    # A fixed class replaces the labels; the noise drawn for a seed stays the same.
    fixed, = generate_images.generate_images(net=net, seeds=seeds, class_idx=2, num_steps=1, verbose=False, device='cpu')
    free, = generate_images.generate_images(net=net, seeds=seeds, num_steps=1, verbose=False, device='cpu')
    assert torch.equal(fixed.noise, free.noise)
    assert torch.equal(fixed.labels, torch.eye(4)[[2] * 4])
    assert free.labels.sum(1).eq(1).all() and not torch.equal(free.labels, fixed.labels)
    assert not np.array_equal(fixed.images, free.images)


def test_student_pickle_uses_its_own_steps(tmp_path):
    cd = {'S': 3, 'sigma_min': 0.01, 'sigma_max': 10.0, 'rho': 5.0, 'T_start': 8}
    path = save_pickle(network_pickle(CountingNet(tiny_precond(frozen=True)), cd=cd), tmp_path / 'student.pkl')
    CountingNet.log.clear()
    results = list(generate_images.generate_images(net=path, seeds=range(4), max_batch_size=4, verbose=False, device='cpu'))
    assert len(results) == 1 and results[0].images.shape == (4, 3, 8, 8)
    assert CountingNet.log == pytest.approx(list(karras_nodes(3, 0.01, 10.0, 5.0)), rel=1e-6)

    CountingNet.log.clear()
    list(generate_images.generate_images(net=path, seeds=range(4), num_steps=5, verbose=False, device='cpu'))
    assert len(CountingNet.log) == 5 and CountingNet.log[0] == pytest.approx(10.0)
    CountingNet.log.clear()
    list(generate_images.generate_images(net=path, seeds=range(4), sampler_fn='heun', verbose=False, device='cpu'))
    assert len(CountingNet.log) == 2 * 3 - 1
    CountingNet.log.clear()
    list(generate_images.generate_images(net=path, seeds=range(4), sampler_fn='stochastic', verbose=False, device='cpu'))
    assert len(CountingNet.log) == 3

    with pytest.raises(generate_images.GenerationError, match='[Gg]uidance'):
        list(generate_images.generate_images(net=path, gnet=tiny_precond(frozen=True), guidance=2.0, verbose=False, device='cpu'))
    with pytest.raises(generate_images.GenerationError, match='S_churn'):
        list(generate_images.generate_images(net=path, S_churn=10, verbose=False, device='cpu'))


def test_teacher_pickle_defaults_to_heun(tmp_path):
    path = save_pickle(network_pickle(CountingNet(tiny_precond(frozen=True))), tmp_path / 'teacher.pkl')
    CountingNet.log.clear()
    list(generate_images.generate_images(net=path, seeds=[0], num_steps=4, verbose=False, device='cpu'))
    assert len(CountingNet.log) == 2 * 4 - 1
    assert CountingNet.log[0] == pytest.approx(80) and min(CountingNet.log) == pytest.approx(0.002)


def test_subdirs_group_seeds_by_thousand(tmp_path):
    list(generate_images.generate_images(net=tiny_precond(frozen=True), outdir=str(tmp_path), subdirs=True, seeds=[999, 1000],
                                         num_steps=1, verbose=False, device='cpu'))
    assert sorted(os.listdir(tmp_path)) == ['000000', '001000']
    assert os.listdir(tmp_path / '000000') == ['000999.png'] and os.listdir(tmp_path / '001000') == ['001000.png']


def test_edm2_signatures():
    # EDM2's parameter names and defaults. Where EDM2 defaults to CUDA and to edm_sampler, ours has None:
    # CUDA when available, else the CPU; Heun (edm_sampler) for EDM2 models, the S-step sampler for students.
    empty = inspect.Parameter.empty
    expected = {
        generate_images.edm_sampler: [('net', empty), ('noise', empty), ('labels', None), ('gnet', None), ('num_steps', 32),
                                      ('sigma_min', 0.002), ('sigma_max', 80), ('rho', 7), ('guidance', 1), ('S_churn', 0),
                                      ('S_min', 0), ('S_max', float('inf')), ('S_noise', 1), ('dtype', torch.float32),
                                      ('randn_like', torch.randn_like)],
        generate_images.generate_images: [('net', empty), ('gnet', None), ('encoder', None), ('outdir', None), ('subdirs', False),
                                          ('seeds', range(16, 24)), ('class_idx', None), ('max_batch_size', 32),
                                          ('encoder_batch_size', 4), ('verbose', True), ('device', None), ('sampler_fn', None),
                                          ('sampler_kwargs', empty)],
        generate_images.StackedRandomGenerator: [('device', empty), ('seeds', empty)],
        generate_images.StackedRandomGenerator.randn: [('self', empty), ('size', empty), ('kwargs', empty)],
        generate_images.StackedRandomGenerator.randn_like: [('self', empty), ('input', empty)],
        generate_images.StackedRandomGenerator.randint: [('self', empty), ('args', empty), ('size', empty), ('kwargs', empty)],
        generate_images.parse_int_list: [('s', empty)],
    }
    for fn, params in expected.items():
        assert [(p.name, p.default) for p in inspect.signature(fn).parameters.values()] == params, fn.__qualname__
    assert generate_images.model_root == 'https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions'
    assert generate_images.config_presets['edm2-img512-xs-fid'] == {'net': f'{generate_images.model_root}/edm2-img512-xs-2147483-0.135.pkl'}
    assert generate_images.config_presets['edm2-img64-s-autog-dino'] == {'net': f'{generate_images.model_root}/edm2-img64-s-1073741-0.105.pkl',
                                                                         'gnet': f'{generate_images.model_root}/edm2-img64-xs-0134217-0.175.pkl',
                                                                         'guidance': 2.20}
    assert len(generate_images.config_presets) == 36


def test_stacked_random_generator_draws_per_seed():
    rnd = generate_images.StackedRandomGenerator('cpu', [7, 2 ** 32 + 8])
    noise = rnd.randn([2, 3, 4])
    like = rnd.randn_like(input=noise.to(torch.float64))
    classes = rnd.randint(10, size=[2])
    for i, seed in enumerate([7, 8]):
        g = torch.Generator('cpu').manual_seed(seed)
        assert torch.equal(noise[i], torch.randn([3, 4], generator=g))
        assert torch.equal(like[i], torch.randn([3, 4], generator=g, dtype=torch.float64))
        assert torch.equal(classes[i], torch.randint(10, size=[], generator=g))
    with pytest.raises(ValueError):
        rnd.randn([3, 4])


def test_generate_images_as_edm2_users_call_it(tmp_path):
    from training.encoders import StandardRGBEncoder
    net = tiny_precond(label_dim=3, frozen=True)
    path = save_pickle(network_pickle(net), tmp_path / 'net.pkl')
    seeds = [5, 9, 2]
    image_iter = generate_images.generate_images(path, outdir=str(tmp_path / 'out'), seeds=seeds, max_batch_size=2, num_steps=3,
                                                 verbose=False, device='cpu')
    assert len(image_iter) == 2
    results = list(image_iter)
    assert [sorted(r) for r in results] == [['batch_idx', 'images', 'indices', 'labels', 'noise', 'num_batches', 'seeds']] * 2
    assert [(r.batch_idx, r.num_batches, r.indices.tolist(), r.seeds) for r in results] == [(0, 2, [0, 1], [5, 9]), (1, 2, [2], [2])]

    rnd = generate_images.StackedRandomGenerator('cpu', seeds)
    noise = rnd.randn([3, 3, 8, 8])
    labels = torch.eye(3)[rnd.randint(3, size=[3])]
    with torch.no_grad():
        expected = StandardRGBEncoder().decode(generate_images.edm_sampler(net, noise, labels, num_steps=3))
    assert torch.equal(torch.cat([r.noise for r in results]), noise) and torch.equal(torch.cat([r.labels for r in results]), labels)
    assert torch.equal(torch.cat([r.images for r in results]), expected)
    for seed, image in zip(seeds, expected.numpy()):
        assert np.array_equal(read_png(tmp_path / 'out' / f'{seed:06d}.png'), image)

    # No seeds at all: one empty batch, as a rank without work gets.
    empty, = generate_images.generate_images(net, seeds=[], verbose=False, device='cpu')
    assert empty.images is None and empty.labels is None and empty.noise is None and empty.seeds == []


def recording_sampler(net, noise, labels=None, gnet=None, randn_like=None, marker=None):
    recording_sampler.calls.append(dict(net=net, gnet=gnet, marker=marker))
    return torch.zeros_like(noise)


recording_sampler.calls = []


class FakeEncoder:
    batch_size = 99

    def init(self, device):
        pass

    def decode(self, latents):
        return torch.full(latents.shape, 7, dtype=torch.uint8)


def test_generate_images_custom_sampler_gnet_and_encoder():
    net, guide = tiny_precond(frozen=True), tiny_precond(seed=1, frozen=True)
    for sampler_fn in (recording_sampler, f'{__name__}.recording_sampler'):
        recording_sampler.calls.clear()
        r, = generate_images.generate_images(net, seeds=[1], sampler_fn=sampler_fn, marker='m', verbose=False, device='cpu')
        assert recording_sampler.calls == [dict(net=net, gnet=net, marker='m')]  # gnet None means the main network
    recording_sampler.calls.clear()
    list(generate_images.generate_images(net, guide, seeds=[1], sampler_fn=recording_sampler, verbose=False, device='cpu'))
    assert recording_sampler.calls[0]['gnet'] is guide

    encoder = FakeEncoder()
    r, = generate_images.generate_images(net, encoder=encoder, seeds=[1, 2], encoder_batch_size=None, num_steps=1, verbose=False, device='cpu')
    assert encoder.batch_size == 99 and torch.equal(r.images, torch.full([2, 3, 8, 8], 7, dtype=torch.uint8))
    list(generate_images.generate_images(net, encoder=encoder, seeds=[1], num_steps=1, verbose=False, device='cpu'))
    assert encoder.batch_size == 4


def test_parse_int_list():
    assert generate_images.parse_int_list('0-3,7,10-11') == [0, 1, 2, 3, 7, 10, 11]
    for bad in ('a', '3-1', '1-2-3', ''):
        with pytest.raises(Exception, match=bad or '""'):
            generate_images.parse_int_list(bad)

#----------------------------------------------------------------------------
# Command line.

def test_cli_writes_pngs_and_grid(tmp_path):
    net = tiny_precond(frozen=True)
    path = save_pickle(network_pickle(net), tmp_path / 'net.pkl')
    outdir = tmp_path / 'out'
    run_script('generate_images.py', f'--net={path}', f'--outdir={outdir}', '--seeds=0-4', '--batch=2', '--steps=4',
               f'--grid={tmp_path}/grid.png')
    assert sorted(os.listdir(outdir)) == [f'{seed:06d}.png' for seed in range(5)]
    expected = collect(net=net, seeds=range(5), num_steps=4)
    for seed in range(5):
        assert np.array_equal(read_png(outdir / f'{seed:06d}.png'), expected[seed])
    grid = read_png(tmp_path / 'grid.png')
    assert grid.shape == (3, 2 * 8, 3 * 8)  # 5 images -> 3 columns, 2 rows
    assert np.array_equal(grid[:, 8:16, 8:16], expected[4])
    assert np.all(grid[:, 8:16, 16:24] == 0)



@pytest.mark.slow
def test_cli_student_uses_consistency_sampler(tmp_path):
    net = tiny_precond(seed=1, frozen=True)
    cd = {'S': 2, 'sigma_min': 0.002, 'sigma_max': 80.0, 'rho': 7.0}
    path = save_pickle(network_pickle(net, cd=cd), tmp_path / 'student.pkl')
    run_script('generate_images.py', f'--net={path}', f'--outdir={tmp_path}/out', '--seeds=5,6')
    rnd = generate_images.StackedRandomGenerator('cpu', [5, 6])
    noise = rnd.randn([2, 3, 8, 8])
    with torch.no_grad():
        latents = generate_images.consistency_sampler(net, noise, num_steps=2)
    from training.encoders import StandardRGBEncoder
    expected = StandardRGBEncoder().decode(latents).numpy()
    assert np.array_equal(read_png(tmp_path / 'out' / '000005.png'), expected[0])
    assert np.array_equal(read_png(tmp_path / 'out' / '000006.png'), expected[1])

    proc = run_script('generate_images.py', f'--net={path}', f'--gnet={path}', '--guidance=2', f'--outdir={tmp_path}/bad', check=False)
    assert proc.returncode != 0 and 'guidance' in proc.stderr.lower() and 'Traceback' not in proc.stderr


def test_cli_rejects_guidance_without_gnet(tmp_path):
    result = invoke(generate_images.cmdline, '--net=net.pkl', '--guidance=2', f'--outdir={tmp_path}')
    assert result.exit_code != 0 and '--gnet' in result.output
    result = invoke(generate_images.cmdline, f'--outdir={tmp_path}')
    assert result.exit_code != 0 and '--net' in result.output


@pytest.mark.slow
def test_torchrun_splits_seeds_across_ranks(tmp_path):
    net = tiny_precond(frozen=True)
    path = save_pickle(network_pickle(net), tmp_path / 'net.pkl')
    run_script('generate_images.py', f'--net={path}', f'--outdir={tmp_path}/out', '--seeds=0-6', '--batch=2', '--steps=2',
               f'--grid={tmp_path}/grid.png', launcher=torchrun())
    expected = collect(net=net, seeds=range(7), num_steps=2)
    for seed in range(7):
        assert np.array_equal(read_png(tmp_path / 'out' / f'{seed:06d}.png'), expected[seed])
    grid = read_png(tmp_path / 'grid.png')
    assert grid.shape == (3, 3 * 8, 3 * 8)
    assert np.array_equal(grid[:, 16:24, 0:8], expected[6])

#----------------------------------------------------------------------------
# Bad inputs and bad samples: one-line errors (helpers.error_line, assert_user_error), and nothing written.

def nan_weight_net():
    net = tiny_precond(frozen=True)
    with torch.no_grad():
        dict(net.named_parameters())['unet.enc.8x8_conv.weight'].view(-1)[0] = float('nan')
    return net


@pytest.fixture(scope='module')
def bad_network_files(tmp_path_factory):
    """name -> (path, what the message must say) for network pickles that must be refused."""
    root = tmp_path_factory.mktemp('bad_networks')
    whole = pickle.dumps(network_pickle(tiny_precond(frozen=True)))
    contents = {'empty.pkl': b'', 'half.pkl': whole[:len(whole) // 2], 'random.pkl': np.random.default_rng(0).bytes(4000),
                'list.pkl': pickle.dumps([1, 2, 3]), 'nan.pkl': pickle.dumps(network_pickle(nan_weight_net()))}
    for name, data in contents.items():
        (root / name).write_bytes(data)
    (root / 'folder.pkl').mkdir()
    expected = {'empty.pkl': 'empty or truncated', 'half.pkl': 'truncated', 'random.pkl': 'not a readable pickle',
                'list.pkl': 'not a network pickle', 'nan.pkl': 'non-finite', 'folder.pkl': 'directory',
                'missing.pkl': 'does not exist'}
    return {name: (str(root / name), why) for name, why in expected.items()}


def test_cli_refuses_bad_network_pickles_before_creating_outdir(tmp_path, bad_network_files, no_process_group):
    good = save_pickle(network_pickle(tiny_precond(frozen=True)), tmp_path / 'good.pkl')
    outdir, grid = tmp_path / 'out', tmp_path / 'grids' / 'grid.png'
    for name, (path, why) in bad_network_files.items():
        common = [f'--outdir={outdir}', '--seeds=0-1', '--steps=1', f'--grid={grid}']
        result = invoke(generate_images.cmdline, f'--net={path}', *common)
        assert_user_error(result, f'--net: {path}', why)
        result = invoke(generate_images.cmdline, f'--net={good}', f'--gnet={path}', '--guidance=2', *common)
        assert_user_error(result, f'--gnet: {path}', why)
    assert sorted(os.listdir(tmp_path)) == ['good.pkl']


def test_cli_truncated_network_is_one_line_in_a_real_process(tmp_path, bad_network_files):
    path, _why = bad_network_files['half.pkl']
    proc = run_script('generate_images.py', f'--net={path}', f'--outdir={tmp_path}/out', check=False)
    assert proc.returncode == 1 and f'--net: {path}' in error_line(proc.stderr)
    assert os.listdir(tmp_path) == []


def test_cli_float_options_must_be_finite_and_in_range(tmp_path):
    for option, value in [('sigma_min', 'nan'), ('sigma_min', '0'), ('sigma_max', 'inf'), ('sigma_max', '-1'), ('rho', 'nan'),
                          ('guidance', 'nan'), ('guidance', 'inf'), ('S_churn', 'nan'), ('S_churn', '-1'), ('S_min', 'inf'),
                          ('S_max', 'nan'), ('S_max', '-1'), ('S_noise', 'nan'), ('S_noise', '-inf')]:
        result = invoke(generate_images.cmdline, '--net=net.pkl', f'--outdir={tmp_path}/out', f'--{option}={value}')
        assert_user_error(result, f"'--{option}'", exit_code=2)
    assert os.listdir(tmp_path) == []
    # --S_max may be infinite (its default).
    context = generate_images.cmdline.make_context('generate_images.py', ['--net=net.pkl', f'--outdir={tmp_path}', '--S_max=inf'])
    assert context.params['S_max'] == float('inf')


def test_cli_refuses_an_empty_noise_range(tmp_path, no_process_group):
    path = save_pickle(network_pickle(tiny_precond(frozen=True)), tmp_path / 'net.pkl')
    result = invoke(generate_images.cmdline, f'--net={path}', f'--outdir={tmp_path}/out', '--sigma_min=5', '--sigma_max=1')
    assert_user_error(result, 'sigma_min = 5.0 is above sigma_max = 1.0')
    student = save_pickle(network_pickle(tiny_precond(frozen=True), cd=dict(S=2, sigma_min=0.002, sigma_max=80.0, rho=7.0)), tmp_path / 'student.pkl')
    result = invoke(generate_images.cmdline, f'--net={student}', f'--outdir={tmp_path}/out', '--sigma_max=0.001')
    assert_user_error(result, 'sigma_min = 0.002 is above sigma_max = 0.001')
    assert sorted(os.listdir(tmp_path)) == ['net.pkl', 'student.pkl']


def nan_for_seeds(bad_seeds, shape=(3, 8, 8)):
    """A sampler returning zeros, except NaN in the rows of `bad_seeds` (recognised by their first noise value)."""
    firsts = torch.stack([torch.randn(list(shape), generator=torch.Generator().manual_seed(seed))[0, 0, 0] for seed in bad_seeds])

    def sampler(net, noise, labels=None, randn_like=None):
        out = torch.zeros_like(noise)
        out[torch.isin(noise[:, 0, 0, 0], firsts)] = float('nan')
        return out
    return sampler


def test_non_finite_samples_name_their_seeds_and_write_nothing_of_their_batch(tmp_path):
    outdir = tmp_path / 'out'
    batches = generate_images.generate_images(tiny_precond(frozen=True), outdir=str(outdir), seeds=[4, 5, 6, 7], max_batch_size=2,
                                              sampler_fn=nan_for_seeds([7]), verbose=False, device='cpu')
    with pytest.raises(generate_images.GenerationError, match=r'NaN or inf for 1 of the 2 seeds of a batch \(seeds 7\); no image'):
        list(batches)
    assert sorted(os.listdir(outdir)) == ['000004.png', '000005.png']  # the batch before is complete, no temporary files
    # The first five seeds and the count; without an outdir the batch is still refused.
    with pytest.raises(generate_images.GenerationError, match=r'for 7 of the 8 seeds of a batch \(seeds 0, 1, 2, 3, 5, \.\.\.\)'):
        list(generate_images.generate_images(tiny_precond(frozen=True), seeds=range(8), sampler_fn=nan_for_seeds([0, 1, 2, 3, 5, 6, 7]),
                                             verbose=False, device='cpu'))


def test_nan_weights_loaded_on_purpose_give_no_images(tmp_path):
    from torch_utils import persistence
    path = save_pickle(network_pickle(nan_weight_net()), tmp_path / 'nan.pkl')
    data = persistence.load_network_pickle(path, require_finite=False)
    with pytest.raises(generate_images.GenerationError, match=r'NaN or inf for 3 of the 3 seeds of a batch \(seeds 10, 11, 12\)'):
        list(generate_images.generate_images(data, outdir=str(tmp_path / 'out'), seeds=[10, 11, 12], num_steps=2,
                                             verbose=False, device='cpu'))
    assert os.listdir(tmp_path) == ['nan.pkl']


class NaNNet(torch.nn.Module):
    """Finite weights, NaN denoised images: passes every load-time check, fails the sample check."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones([]))
        self.img_channels, self.img_resolution, self.label_dim = 3, 8, 0

    def forward(self, x, sigma, class_labels=None):
        return x * self.scale * float('nan')


def test_cli_refuses_non_finite_samples(tmp_path, no_process_group):
    path = save_pickle(network_pickle(NaNNet()), tmp_path / 'nan_out.pkl')
    result = invoke(generate_images.cmdline, f'--net={path}', f'--outdir={tmp_path}/out', '--seeds=3-5', '--steps=2',
                                                          f'--grid={tmp_path}/grid.png')
    assert_user_error(result, '3 of the 3 seeds', 'seeds 3, 4, 5', 'no image of this batch was written')
    assert os.listdir(tmp_path) == ['nan_out.pkl']


def test_pngs_and_grid_appear_atomically(tmp_path, monkeypatch, no_process_group):
    path = save_pickle(network_pickle(tiny_precond(frozen=True)), tmp_path / 'net.pkl')
    original_save = PIL.Image.Image.save

    def save_then_fail(image, fp, *args, **kwargs):
        if not isinstance(fp, (str, os.PathLike)):  # a file object: the atomic path
            fp.write(b'\x89PNG half an image')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(PIL.Image.Image, 'save', save_then_fail)
    result = invoke(generate_images.cmdline, f'--net={path}', f'--outdir={tmp_path}/out', '--seeds=0-1', '--steps=1')
    assert_user_error(result, 'Cannot write', '000000.png', 'No space left on device')
    assert os.listdir(tmp_path / 'out') == []  # not even a temporary file

    # The images are written, then the grid fails: it is not left half-written either.
    def fail_on_grid(image, fp, *args, **kwargs):
        if image.size != (8, 8):
            return save_then_fail(image, fp, *args, **kwargs)
        return original_save(image, fp, *args, **kwargs)
    monkeypatch.setattr(PIL.Image.Image, 'save', fail_on_grid)
    result = invoke(generate_images.cmdline, f'--net={path}', f'--outdir={tmp_path}/out', '--seeds=0-1', '--steps=1',
                                                          f'--grid={tmp_path}/grid.png')
    assert_user_error(result, 'Cannot write', 'grid.png')
    assert sorted(os.listdir(tmp_path)) == ['net.pkl', 'out'] and sorted(os.listdir(tmp_path / 'out')) == ['000000.png', '000001.png']
