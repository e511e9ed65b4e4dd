"""Parity and invariant tests for training/consistency_ops.py.

Reference numbers come from tests/fixtures/{karras,grids,weights,edges,ddim,heun,anneal}.npz, copied
from the project's parity set (produced by the MSCD reference); tolerances follow its README.
"""

import numpy as np
import pytest
import torch
from scipy import stats

from helpers import AnalyticTeacher, GaussianDenoiser, RecordingDenoiser, load_fixture
from training import consistency_ops as ops

SAMPLE_FIELDS = ['step_j', 'n_rel', 'k_s', 'sigma_t', 'sigma_s', 'sigma_bdry', 'is_terminal', 'is_boundary_snap']
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def config_names(table):
    return [f'S{S}_T{T}' for S, T in table['configs']]


def parse_tag(tag):
    """'vp_anchor0' -> ('vp', False); 'uniform' -> ('uniform', True)."""
    mode, _, anchor = tag.partition('_anchor')
    return mode, anchor != '0'


def fixture_sampler_inputs(grids, cfg):
    return dict(
        sigma_bounds=torch.from_numpy(grids[f'{cfg}__bounds']),
        teacher_sigmas=torch.from_numpy(grids[f'{cfg}__teacher_sigmas']),
        student_sigmas=torch.from_numpy(grids[f'{cfg}__student_sigmas']),
        terminal_k=int(grids[f'{cfg}__terminal_k']),
    )


#----------------------------------------------------------------------------
# Straightforward loops written from the parity README's rules, to check fresh configurations.

def loop_filter(student, teacher, eps=1e-5):
    num_edges = len(teacher) - 1
    terminal = num_edges - 1
    for k in range(num_edges):
        if teacher[k] > 0 and teacher[k + 1] == 0:
            terminal = k
    interior = [s for s in student[1:] if s > 0]
    kept = []
    for k in range(num_edges):
        close = any(abs(teacher[k] - s) <= eps * max(1, abs(teacher[k]), abs(s)) + eps * abs(s) for s in interior)
        if k in (0, terminal) or not close:
            kept.append(teacher[k])
    return np.array(kept + [teacher[-1]]), len(kept) - 1


def loop_partition(student, teacher):
    bounds = []
    for j in range(len(student) - 1):
        members = [k for k in range(len(teacher) - 1) if student[j + 1] < teacher[k] <= student[j]]
        if not members:
            nearest = int(np.argmin(np.abs(teacher[:-1] - student[j + 1])))
            members = [nearest]
        bounds.append((min(members), max(members)))
    return np.array(bounds)


def random_configs(count, seed):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        S = int(rng.integers(2, 13))
        yield dict(S=S, T=int(rng.integers(S, 400)), sigma_min=float(rng.uniform(1e-3, 0.05)),
            sigma_max=float(rng.uniform(5, 200)), rho=float(rng.uniform(1.5, 10)))

#----------------------------------------------------------------------------
# Grids.

def test_karras_sigmas_match_reference():
    data = load_fixture('karras')
    for i, (num_nodes, sigma_min, sigma_max, rho) in enumerate(data['configs']):
        sigmas = ops.make_karras_sigmas(int(num_nodes), sigma_min, sigma_max, rho)
        assert sigmas.dtype == torch.float64 and sigmas.device.type == 'cpu'
        np.testing.assert_allclose(sigmas.numpy(), data[f'sigmas_{i}'], rtol=1e-12, atol=0)


def test_karras_sigmas_round_fn_and_errors():
    plain = ops.make_karras_sigmas(5, 0.01, 10, 3)
    rounded = ops.make_karras_sigmas(5, 0.01, 10, 3, round_fn=lambda s: torch.round(s * 100) / 100)
    assert torch.equal(rounded, torch.round(plain * 100) / 100)
    assert ops.make_karras_sigmas(1, 0.002, 80, 7).tolist() == [80.0]
    with pytest.raises(ValueError, match='num_nodes'):
        ops.make_karras_sigmas(0, 0.002, 80, 7)
    with pytest.raises(ValueError, match='sigma_min=90'):
        ops.make_karras_sigmas(4, 90, 80, 7)


def test_grids_match_reference():
    grids = load_fixture('grids')
    for cfg, (S, T) in zip(config_names(grids), grids['configs']):
        student, teacher, terminal_k = ops.build_student_teacher_grids(int(S), int(T), 0.002, 80, 7)
        np.testing.assert_allclose(student.numpy(), grids[f'{cfg}__student_sigmas'], rtol=1e-12, atol=0)
        np.testing.assert_allclose(teacher.numpy(), grids[f'{cfg}__teacher_sigmas'], rtol=1e-12, atol=0)
        assert terminal_k == grids[f'{cfg}__terminal_k'] == len(teacher) - 2 == grids[f'{cfg}__T_eff'] - 1

        _, _, raw = ops.inflate_teacher_grid(student, int(T), 0.002, 80, 7)
        assert list(range(int(T), raw + 1)) == grids[f'{cfg}__raw_T_tried'].tolist()
        assert np.array_equal(ops.partition_edges_by_sigma(student, teacher).numpy(), grids[f'{cfg}__bounds'])

        plain = ops.make_edge_grid(int(T), 0.002, 80, 7)
        np.testing.assert_allclose(plain.numpy(), grids[f'{cfg}__plain_teacher_sigmas'], rtol=1e-12, atol=0)
        filtered, filtered_k = ops.filter_teacher_edges_by_sigma(student, plain)
        kept = grids[f'{cfg}__plain_teacher_sigmas'][grids[f'{cfg}__plain_filtered_kept_idx']]
        assert np.array_equal(filtered.numpy(), np.append(kept, 0.0))
        np.testing.assert_allclose(filtered.numpy(), grids[f'{cfg}__plain_filtered_sigmas'], rtol=1e-12, atol=0)
        assert filtered_k == grids[f'{cfg}__plain_filtered_terminal_k']
        bounds = ops.partition_edges_by_sigma(student, filtered)
        assert bounds.dtype == torch.int64 and bounds.shape == (S, 2)
        assert np.array_equal(bounds.numpy(), grids[f'{cfg}__plain_filtered_bounds'])


def test_filter_tolerance_probe_and_partition_fallback():
    grids = load_fixture('grids')
    student = torch.from_numpy(grids['filter_tol__student_sigmas'])
    teacher = torch.from_numpy(grids['filter_tol__teacher_sigmas'])
    filtered, terminal_k = ops.filter_teacher_edges_by_sigma(student, teacher)
    assert np.array_equal(filtered.numpy(), grids['filter_tol__filtered_sigmas'])
    assert np.array_equal(filtered[:-1].numpy(), teacher[:-1].numpy()[grids['filter_tol__kept_mask']])
    assert terminal_k == grids['filter_tol__terminal_k']
    for probe in ['part_fb_a', 'part_fb_b']:
        bounds = ops.partition_edges_by_sigma(torch.from_numpy(grids[f'{probe}__student_sigmas']),
            torch.from_numpy(grids[f'{probe}__teacher_sigmas']))
        assert np.array_equal(bounds.numpy(), grids[f'{probe}__bounds'])


def test_grids_on_fresh_configs_follow_the_rules():
    for cfg in random_configs(25, seed=1):
        student, teacher, terminal_k = ops.build_student_teacher_grids(**cfg)
        plain = ops.make_edge_grid(cfg['T'], cfg['sigma_min'], cfg['sigma_max'], cfg['rho'])
        expect_grid, expect_k = loop_filter(student.tolist(), plain.tolist())
        grid, k = ops.filter_teacher_edges_by_sigma(student, plain)
        assert np.array_equal(grid.numpy(), expect_grid) and k == expect_k

        # The inflated grid is the first raw size whose filtered grid keeps >= T edges.
        _, _, raw = ops.inflate_teacher_grid(student, cfg['T'], cfg['sigma_min'], cfg['sigma_max'], cfg['rho'])
        assert terminal_k == len(teacher) - 2 and len(teacher) - 1 >= cfg['T']
        for smaller in range(cfg['T'], raw):
            trial = ops.make_edge_grid(smaller, cfg['sigma_min'], cfg['sigma_max'], cfg['rho'])
            assert len(loop_filter(student.tolist(), trial.tolist())[0]) - 1 < cfg['T']
        assert np.array_equal(ops.partition_edges_by_sigma(student, teacher).numpy(),
            loop_partition(student.numpy(), teacher.numpy()))


def test_a_higher_last_student_node_leaves_the_teacher_grid_reaching_sigma_min():
    for S, T, last_node in [(4, 64, 0.6), (8, 33, 0.05), (2, 16, 1.0)]:
        student, teacher, terminal_k = ops.build_student_teacher_grids(S, T, 0.002, 80, 7, student_sigma_min=last_node)
        assert torch.equal(student, ops.make_edge_grid(S, last_node, 80, 7))
        assert len(teacher) - 1 >= T and teacher[-1] == 0 and terminal_k == len(teacher) - 2
        assert teacher[-2] == pytest.approx(0.002)
        bounds = ops.partition_edges_by_sigma(student, teacher)
        tops = teacher[:-1]
        for j, (first, last) in enumerate(bounds.tolist()):
            assert first <= last and ((tops[first:last + 1] > student[j + 1]) & (tops[first:last + 1] <= student[j])).all()
        # The last segment runs from the last student node through all the low teacher edges to the terminal one.
        assert bounds[-1, 1] == terminal_k and (tops[bounds[-1, 0]:] <= last_node).all() and tops[bounds[-1, 0] - 1] > last_node
    default = ops.build_student_teacher_grids(4, 64, 0.002, 80, 7)
    for got, expected in zip(ops.build_student_teacher_grids(4, 64, 0.002, 80, 7, student_sigma_min=0.002), default):
        assert torch.equal(torch.as_tensor(got), torch.as_tensor(expected))


def test_inflation_adds_one_edge_when_student_nodes_coincide():
    # For S = 8 (S-1 = 7 prime) all interior student nodes are teacher nodes exactly when 7 | (T-1).
    for T, T_eff in [(64, 65), (260, 261), (100, 100), (257, 257)]:
        assert len(ops.build_student_teacher_grids(8, T, 0.002, 80, 7)[1]) - 1 == T_eff


def test_partition_rejects_unsorted_grids():
    student = ops.make_edge_grid(4, 0.002, 80, 7)
    with pytest.raises(ValueError, match=r'teacher_sigmas\[1\] = 1\.0 < teacher_sigmas\[2\] = 2\.0'):
        ops.partition_edges_by_sigma(student, torch.tensor([5.0, 1.0, 2.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match='student_sigmas'):
        ops.partition_edges_by_sigma(student.flip(0), ops.make_edge_grid(8, 0.002, 80, 7))


def test_anneal_schedule_matches_reference():
    data = load_fixture('anneal')
    for case in ['a', 'defaults', 'no_anneal']:
        T_start, T_end, horizon = data[f'{case}__params']
        schedule = [ops.annealed_teacher_edges(float(kimg), int(T_start), int(T_end), float(horizon))
            for kimg in data[f'{case}__kimg']]
        assert schedule == data[f'{case}__T_edges'].tolist()
        T_eff = [len(ops.build_student_teacher_grids(8, T, 0.002, 80, 7)[1]) - 1 for T in sorted(set(schedule))]
        assert dict(zip(sorted(set(schedule)), T_eff)) == dict(zip(schedule, data[f'{case}__T_eff_S8'].tolist()))

#----------------------------------------------------------------------------
# Importance weights and edge sampling.

def test_importance_weights_match_reference():
    data = load_fixture('weights')
    for case in data['case_names']:
        rho, P_mean, P_std = data[f'{case}__params']
        teacher = torch.from_numpy(data[f'{case}__teacher_sigmas'])
        for mode in ['uniform', 'vp', 'edm']:
            for anchor in [0, 1]:
                probs = ops.compute_importance_weights(teacher, rho, mode, P_mean, P_std, bool(anchor))
                assert probs.dtype == torch.float32
                np.testing.assert_allclose(probs.numpy(), data[f'{case}__{mode}__anchor{anchor}'], rtol=1e-5, atol=0)


def test_importance_weights_on_fresh_grids_follow_formulas():
    for cfg in random_configs(10, seed=2):
        _, teacher, _ = ops.build_student_teacher_grids(**cfg)
        sigma, rho, T_eff = teacher[:-1].numpy(), cfg['rho'], len(teacher) - 1
        P_mean, P_std = np.random.default_rng(cfg['T']).uniform([-2, 0.5], [1, 2])
        lognormal = np.exp(-0.5 * ((np.log(sigma + 1e-10) - P_mean) / P_std) ** 2)
        for mode, weights in [('vp', (sigma + 1e-10) ** (1 - 1 / rho) / (1 + sigma ** 2)),
                ('edm', (sigma + 1e-10) ** (-1 / rho) * lognormal)]:
            free = ops.compute_importance_weights(teacher, rho, mode, P_mean, P_std, terminal_anchor=False)
            np.testing.assert_allclose(free.numpy(), weights / weights.sum(), rtol=1e-5)
            anchored = ops.compute_importance_weights(teacher, rho, mode, P_mean, P_std).numpy()
            assert anchored[-1] == np.float32(1 / T_eff)
            np.testing.assert_allclose(anchored[:-1], weights[:-1] / weights[:-1].sum() * (1 - 1 / T_eff), rtol=1e-5)
    with pytest.raises(ValueError, match="'cosine'"):
        ops.compute_importance_weights(teacher, 7.0, 'cosine')


def test_sampler_reproduces_reference_draws_exactly():
    # The parity set's optional RNG-exact check: same CPU generator consumption as the reference.
    edges, grids = load_fixture('edges'), load_fixture('grids')
    for cfg in config_names(edges):
        for tag in edges['sampling_modes']:
            mode, anchor = parse_tag(tag)
            generator = torch.Generator().manual_seed(int(edges[f'{cfg}__rng32__{tag}__seed']))
            draw = ops.sample_segment_and_teacher_pair(**fixture_sampler_inputs(grids, cfg), batch_size=32,
                device='cpu', generator=generator, sampling_mode=mode, terminal_anchor=anchor)
            assert np.array_equal(draw['k_t'].numpy(), edges[f'{cfg}__rng32__{tag}__k_t'])
            assert np.array_equal(draw['step_j'].numpy(), edges[f'{cfg}__rng32__{tag}__step_j'])


def check_draw_frequencies(cfg_names, num_draws):
    """Every draw matches the reference's per-edge table, and counts fit the reference probabilities.

    Each edge count is Binomial(num_draws, p_k) under the reference; an exact two-sided binomial
    p-value is computed per edge and all are tested at a family-wise level of 1e-3 (Bonferroni over
    every edge of every config and mode). Seeds are the reference's own empirical-draw seeds.
    """
    edges, grids = load_fixture('edges'), load_fixture('grids')
    p_values = []
    for cfg in cfg_names:
        for tag in edges['sampling_modes']:
            mode, anchor = parse_tag(tag)
            generator = torch.Generator().manual_seed(int(edges[f'{cfg}__emp_seed__{tag}']))
            draw = ops.sample_segment_and_teacher_pair(**fixture_sampler_inputs(grids, cfg), batch_size=num_draws,
                device='cpu', generator=generator, sampling_mode=mode, terminal_anchor=anchor)
            k_t = draw['k_t'].numpy()
            for field in SAMPLE_FIELDS:
                assert np.array_equal(draw[field].numpy(), edges[f'{cfg}__{field}'][k_t]), (cfg, tag, field)
            prob = edges[f'{cfg}__prob__{tag}']
            counts = np.bincount(k_t, minlength=len(prob))
            assert not counts[prob == 0].any(), (cfg, tag)
            tails = np.minimum(stats.binom.cdf(counts, num_draws, prob), stats.binom.sf(counts - 1, num_draws, prob))
            p_values.append(np.minimum(2 * tails, 1))
    p_values = np.concatenate(p_values)
    assert p_values.min() > 1e-3 / len(p_values), f'edge frequency off: p = {p_values.min():.3g} over {len(p_values)} edges'


def test_draw_frequencies_small_grids():
    check_draw_frequencies(['S2_T8', 'S8_T8', 'S4_T16', 'S8_T22', 'S8_T64'], num_draws=100_000)


@pytest.mark.slow
def test_draw_frequencies_all_configs():
    check_draw_frequencies(config_names(load_fixture('edges')), num_draws=200_000)


def test_per_edge_table_matches_reference_for_every_edge():
    # Enumerate every edge through the sampler: the uniform mode maps (j, u) deterministically.
    edges, grids = load_fixture('edges'), load_fixture('grids')
    for cfg in config_names(edges):
        inputs = fixture_sampler_inputs(grids, cfg)
        table = {field: edges[f'{cfg}__{field}'] for field in SAMPLE_FIELDS}
        generator = torch.Generator().manual_seed(0)
        # 30000 draws give every edge of the largest grid (p >= 1/(8 * 184)) about 20 expected hits.
        draw = ops.sample_segment_and_teacher_pair(**inputs, batch_size=30_000, device='cpu', generator=generator,
            sampling_mode='uniform')
        k_t = draw['k_t'].numpy()
        assert set(k_t.tolist()) == set(edges[f'{cfg}__k_t'].tolist())
        for field in SAMPLE_FIELDS:
            assert np.array_equal(draw[field].numpy(), table[field][k_t]), (cfg, field)


def test_sampler_draws_the_same_edges_from_kept_probabilities():
    """The CD loss computes the importance weights once per grid and passes them in (edge_probs)."""
    student, teacher, terminal_k = ops.build_student_teacher_grids(S=4, T=64, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    bounds = ops.partition_edges_by_sigma(student, teacher)
    for mode in ('vp', 'edm'):
        kept = ops.compute_importance_weights(teacher, 7.0, mode)
        draws = [ops.sample_segment_and_teacher_pair(bounds, teacher, student, 512, 'cpu',
            generator=torch.Generator().manual_seed(5), terminal_k=terminal_k, sampling_mode=mode, edge_probs=probs)
            for probs in (None, kept)]
        assert all(torch.equal(draws[0][name], draws[1][name]) for name in draws[0]), mode
    skewed = torch.zeros(len(teacher) - 1)
    skewed[3] = 1
    draw = ops.sample_segment_and_teacher_pair(bounds, teacher, student, 64, 'cpu', terminal_k=terminal_k, edge_probs=skewed)
    assert torch.equal(draw['k_t'], torch.full([64], 3))


@pytest.mark.parametrize('device', DEVICES)
def test_sampler_invariants_on_fresh_configs(device):
    torch.manual_seed(3)
    for index, cfg in enumerate(random_configs(20, seed=3)):
        student, teacher, terminal_k = ops.build_student_teacher_grids(**cfg)
        bounds = ops.partition_edges_by_sigma(student, teacher)
        S, T_eff = cfg['S'], len(teacher) - 1
        mode = ['uniform', 'vp', 'edm'][index % 3]
        draw = ops.sample_segment_and_teacher_pair(bounds, teacher, student, 4096, device,
            terminal_k=terminal_k, sampling_mode=mode, rho=cfg['rho'], terminal_anchor=index % 2 == 0)
        assert all(draw[name].device.type == device for name in draw)
        draw = {name: value.cpu() for name, value in draw.items()}
        j, k_t, n_rel = draw['step_j'], draw['k_t'], draw['n_rel']
        sigma_t, sigma_s, sigma_bdry = draw['sigma_t'], draw['sigma_s'], draw['sigma_bdry']
        terminal, snap = draw['is_terminal'], draw['is_boundary_snap']
        general = ~terminal & ~snap
        for name in ['step_j', 'n_rel', 'k_t', 'k_s']:
            assert draw[name].dtype == torch.int64
        for name in ['sigma_t', 'sigma_s', 'sigma_bdry']:
            assert draw[name].dtype == torch.float64

        # Consistency with the grids and the partition.
        assert torch.equal(draw['k_s'], (k_t + 1).clamp_max(T_eff))
        assert torch.equal(sigma_t, teacher[k_t]) and torch.equal(sigma_s, teacher[draw['k_s']])
        assert torch.equal(sigma_bdry, student[j + 1])
        assert torch.equal(n_rel, bounds[j, 1] - k_t + 1)
        assert ((bounds[j, 0] <= k_t) & (k_t <= bounds[j, 1])).all()

        # Ordering per edge class (docs/algorithm.md §7).
        assert torch.equal(terminal, k_t == terminal_k)
        assert (j[terminal] == S - 1).all() and (sigma_s[terminal] == 0).all()
        assert torch.allclose(sigma_t[terminal], torch.tensor(cfg['sigma_min'], dtype=torch.float64), rtol=1e-12)
        assert (n_rel[snap] == 1).all() and (j[snap] < S - 1).all()
        assert ((sigma_s[snap] <= sigma_bdry[snap]) & (sigma_bdry[snap] < sigma_t[snap])).all()
        assert (n_rel[general] >= 2).all()
        assert ((sigma_bdry[general] < sigma_s[general]) & (sigma_s[general] < sigma_t[general])).all()
        interior = ~terminal & (j > 0)
        assert (sigma_t[interior] < student[j[interior]] - 1e-8).all()
        assert (sigma_t <= student[j]).all() and (sigma_t > sigma_s).all()


def test_uniform_mode_gives_terminal_edge_one_over_S():
    student, teacher, terminal_k = ops.build_student_teacher_grids(8, 256, 0.002, 80, 7)
    bounds = ops.partition_edges_by_sigma(student, teacher)
    generator = torch.Generator().manual_seed(4)
    draw = ops.sample_segment_and_teacher_pair(bounds, teacher, student, 80_000, 'cpu', generator=generator,
        terminal_k=terminal_k, sampling_mode='uniform', terminal_anchor=True)
    share = draw['is_terminal'].double().mean().item()
    # Binomial(80000, 1/8) has standard deviation 0.0012; allow 5 of them.
    assert abs(share - 1 / 8) < 5 * 0.0012

#----------------------------------------------------------------------------
# DDIM, inverse DDIM, Heun hop.

@pytest.mark.parametrize('case', ['f32', 'f64', 'scalar'])
def test_ddim_and_inverse_match_reference(case):
    data = load_fixture('ddim')
    get = lambda key: torch.from_numpy(data[f'{case}__{key}'])
    step = ops.ddim_step_edm(get('x_t'), get('x_pred_t'), get('sigma_t'), get('sigma_s'))
    inverse = ops.inv_ddim_edm(get('x_ref'), get('x_t'), get('sigma_t'), get('sigma_ref'))
    tol = dict(rtol=1e-6, atol=1e-6) if case == 'f32' else dict(rtol=1e-12, atol=1e-10)
    for out, key in [(step, 'ddim_out'), (inverse, 'inv_out')]:
        assert out.dtype == get('x_t').dtype
        np.testing.assert_allclose(out.numpy(), data[f'{case}__{key}'], **tol)


def test_ddim_inverse_roundtrip_and_special_rows():
    data = load_fixture('ddim')
    get = lambda key: torch.from_numpy(data[f'f64__{key}'])
    x_t, x_ref, sigma_t, sigma_ref = get('x_t'), get('x_ref'), get('sigma_t'), get('sigma_ref')
    target = ops.inv_ddim_edm(x_ref, x_t, sigma_t, sigma_ref)
    landed = ops.ddim_step_edm(x_t, target, sigma_t, sigma_ref)
    well_posed = (sigma_t / (sigma_t - sigma_ref)) < 100
    np.testing.assert_allclose(landed[well_posed].numpy(), x_ref[well_posed].numpy(), rtol=1e-10, atol=1e-10)
    no_noise = get('sigma_s') == 0
    assert torch.equal(ops.ddim_step_edm(x_t, get('x_pred_t'), sigma_t, get('sigma_s'))[no_noise], get('x_pred_t')[no_noise])
    np.testing.assert_allclose(target[sigma_ref == 0].numpy(), x_ref[sigma_ref == 0].numpy(), rtol=1e-15, atol=0)


def test_degenerate_sigmas_raise_clear_errors():
    x = torch.randn(3, 2, 4, 4)
    sigma_t = torch.tensor([2.5, 1.0, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match=r'degenerate sigma pair for samples \[1\].*sigma_t = 1\.0, sigma_ref = 0\.9999999999995'):
        ops.inv_ddim_edm(x, x, sigma_t, sigma_t - torch.tensor([0.1, 5e-13, 0.2], dtype=torch.float64))
    ops.inv_ddim_edm(x, x, sigma_t, sigma_t - 2e-12)  # Just above the threshold: allowed.
    with pytest.raises(ValueError, match=r'sigma_t must be positive.*samples \[2\]'):
        ops.inv_ddim_edm(x, x, torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match=r'ddim_step_edm: sigma_t must be positive'):
        ops.ddim_step_edm(x, x, torch.zeros(3, dtype=torch.float64), 0.0)
    with pytest.raises(ValueError, match=r'heun_hop_edm: sigma_s must be positive.*samples \[0\]'):
        ops.heun_hop_edm(AnalyticTeacher(), x, sigma_t, torch.tensor([0.0, 0.5, 0.2], dtype=torch.float64))


def test_unchecked_steps_give_the_same_values_and_skip_the_checks():
    x, x_pred = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    sigma_t = torch.tensor([2.5, 1.0, 0.5], dtype=torch.float64)
    sigma_s = torch.tensor([1.5, 0.3, 0.1], dtype=torch.float64)
    teacher = AnalyticTeacher()
    for unchecked, checked in [
            (ops.ddim_step_edm(x, x_pred, sigma_t, sigma_s, check=False), ops.ddim_step_edm(x, x_pred, sigma_t, sigma_s)),
            (ops.inv_ddim_edm(x_pred, x, sigma_t, sigma_s, check=False), ops.inv_ddim_edm(x_pred, x, sigma_t, sigma_s)),
            (ops.heun_hop_edm(teacher, x, sigma_t, sigma_s, check=False), ops.heun_hop_edm(teacher, x, sigma_t, sigma_s))]:
        assert torch.equal(unchecked, checked)
    # Unchecked, a zero sigma_t yields non-finite values instead of an error.
    assert not ops.ddim_step_edm(x, x_pred, torch.zeros(3, dtype=torch.float64), sigma_s, check=False).isfinite().all()


@pytest.mark.parametrize('case', ['f32', 'f64'])
def test_heun_hop_matches_reference(case):
    data = load_fixture('heun')
    x_t = torch.from_numpy(data[f'{case}__x_t'])
    sigma_t, sigma_s = torch.from_numpy(data['sigma_t']), torch.from_numpy(data['sigma_s'])
    teacher = AnalyticTeacher()
    # Vectorised float32 tanh differs in the last bit between CPU instruction sets (AVX2, AVX-512).
    np.testing.assert_allclose(teacher(x_t.float(), sigma_t).numpy(), data[f'{case}__D_at_x_t'], rtol=1e-6, atol=1e-7)
    out = ops.heun_hop_edm(teacher, x_t, sigma_t, sigma_s)
    assert out.dtype == x_t.dtype
    np.testing.assert_allclose(out.numpy(), data[f'{case}__out'], rtol=1e-6, atol=1e-6)
    scalar = ops.heun_hop_edm(teacher, torch.from_numpy(data['scalar__x_t']),
        torch.from_numpy(data['scalar__sigma_t']), torch.from_numpy(data['scalar__sigma_s']))
    np.testing.assert_allclose(scalar.numpy(), data['scalar__out'], rtol=1e-6, atol=1e-6)


def gaussian_hop_errors(hop_fn, device, hops=(0.2, 0.1)):
    """Max error of hop_fn from sigma 1 down by each hop on data ~ N(0, 0.5^2 I), whose ODE solution is
    x * sqrt((s^2 + d^2) / (t^2 + d^2)); the outputs must stay on the device and carry no gradient."""
    net = GaussianDenoiser(mu=0.0, s=0.5)
    x_t = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device)
    sigma_t = torch.full([4], 1.0, dtype=torch.float64, device=device)
    errors = []
    for hop in hops:
        sigma_s = sigma_t - hop
        exact = x_t * ((sigma_s ** 2 + 0.25) / (sigma_t ** 2 + 0.25)).sqrt().reshape(-1, 1, 1, 1)
        out = hop_fn(net, x_t, sigma_t, sigma_s)
        assert out.device == x_t.device and not out.requires_grad
        errors.append((out - exact).abs().max().item())
    return errors


@pytest.mark.parametrize('device', DEVICES)
def test_heun_hop_is_second_order_on_gaussian_data(device):
    errors = gaussian_hop_errors(ops.heun_hop_edm, device)
    # Local error of a 2nd-order method is O(h^3): halving the hop shrinks it about 8x.
    assert 5 < errors[0] / errors[1] < 11

#----------------------------------------------------------------------------
# The one-evaluation teacher solvers: DDIM and adjusted DDIM (docs/algorithm.md §8.5).

def solver_inputs(seed=7):
    """Tiny float64 batch: x_t, clean y it was made from, and per-sample sigma_t > sigma_s (one hop to 0)."""
    generator = torch.Generator().manual_seed(seed)
    y = 0.3 + 0.5 * torch.randn(3, 2, 2, 2, generator=generator, dtype=torch.float64)
    sigma_t = torch.tensor([2.5, 0.7, 0.04], dtype=torch.float64)
    sigma_s = torch.tensor([1.5, 0.3, 0.0], dtype=torch.float64)
    x_t = y + sigma_t.reshape(-1, 1, 1, 1) * torch.randn(y.shape, generator=generator, dtype=torch.float64)
    return x_t, y, sigma_t, sigma_s


def gaussian_posterior_mean(x, sigma, mu=0.3, s=0.5):
    return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)


def test_ddim_hop_is_one_euler_step_of_the_teacher():
    x_t, _, sigma_t, sigma_s = solver_inputs()
    net = RecordingDenoiser(GaussianDenoiser(mu=0.3, s=0.5))
    out = ops.ddim_hop_edm(net, x_t, sigma_t, sigma_s)
    assert len(net.calls) == 1 and net.calls[0][0].dtype == torch.float32  # the net sees float32 images
    assert torch.equal(net.calls[0][1], sigma_t)
    assert out.dtype == torch.float64 and not out.requires_grad
    for i in range(3):
        t, s = float(sigma_t[i]), float(sigma_s[i])
        denoised = gaussian_posterior_mean(x_t[i].float().double(), t)  # the net's float32 input, in float64
        expected = denoised + (s / t) * (x_t[i] - denoised)
        np.testing.assert_allclose(out[i].numpy(), expected.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out[2].numpy(), gaussian_posterior_mean(x_t[2], 0.04).numpy(), rtol=1e-6)  # to 0: D
    # Scalar sigmas and float32 state.
    scalar = ops.ddim_hop_edm(GaussianDenoiser(mu=0.3), x_t.float(), 1.0, 0.5)
    assert scalar.dtype == torch.float32
    denoised = gaussian_posterior_mean(x_t.float().double(), 1.0)
    np.testing.assert_allclose(scalar.numpy(), (denoised + 0.5 * (x_t - denoised)).numpy(), rtol=1e-6, atol=1e-6)


def hand_written_addim(x_t, denoised, y, sigma_t, sigma_s, eta):
    """Heek et al. 2024, Algorithm 3 / Eq. 14, with alpha = 1: per sample, in float64 NumPy."""
    out = []
    for i in range(len(x_t)):
        x, D, clean = x_t[i].numpy(), denoised[i].numpy(), y[i].numpy()
        t, s, d = float(sigma_t[i]), float(sigma_s[i]), x.size
        eps_hat = (x - D) / t
        x_var = eta * np.sum((D - clean) ** 2) / d
        z_var = (1 - s / t) ** 2 * x_var
        out.append(D + np.sqrt(s ** 2 + d / np.sum(eps_hat ** 2) * z_var) * eps_hat)
    return np.stack(out)


def test_addim_hop_matches_the_papers_step():
    x_t, y, sigma_t, sigma_s = solver_inputs()
    net = RecordingDenoiser(GaussianDenoiser(mu=0.3, s=0.5))
    for eta in (0.75, 0.3, 1.0):
        net.calls.clear()
        out = ops.addim_hop_edm(net, x_t, sigma_t, sigma_s, y, eta)
        assert len(net.calls) == 1 and out.dtype == torch.float64
        denoised = gaussian_posterior_mean(x_t.float().double(), sigma_t.reshape(-1, 1, 1, 1))
        np.testing.assert_allclose(out.numpy(), hand_written_addim(x_t, denoised, y, sigma_t, sigma_s, eta),
            rtol=1e-6, atol=1e-7)
    # The adjustment lengthens the noise part of the DDIM step, never shortens it, and is nonzero here.
    ddim = ops.ddim_hop_edm(GaussianDenoiser(mu=0.3), x_t, sigma_t, sigma_s)
    denoised = gaussian_posterior_mean(x_t.float().double(), sigma_t.reshape(-1, 1, 1, 1))
    ratio = ((out - denoised).flatten(1).norm(dim=1) / (ddim - denoised).flatten(1).norm(dim=1))
    assert (ratio[:2] > 1 + 1e-3).all()
    assert ((out - denoised).flatten(1).norm(dim=1)[2] > 0)  # the hop to sigma = 0 keeps some of the noise


def test_addim_without_its_correction_is_ddim():
    x_t, y, sigma_t, sigma_s = solver_inputs()
    net = GaussianDenoiser(mu=0.3)
    assert torch.equal(ops.addim_hop_edm(net, x_t, sigma_t, sigma_s, y, 0.0), ops.ddim_hop_edm(net, x_t, sigma_t, sigma_s))
    # The same for the step given a prediction: zero posterior variance, or a hop of length 0.
    x_pred = torch.randn_like(x_t)
    ddim = ops.ddim_step_edm(x_t, x_pred, sigma_t, sigma_s)
    assert torch.equal(ops.addim_step_edm(x_t, x_pred, sigma_t, sigma_s, torch.zeros(3, dtype=torch.float64)), ddim)
    assert torch.equal(ops.addim_step_edm(x_t, x_pred, sigma_t, sigma_t, 0.4), ops.ddim_step_edm(x_t, x_pred, sigma_t, sigma_t))
    # Clean data equal to the teacher's prediction: no error, so no variance to restore.
    denoised = net(x_t.float(), sigma_t).double()
    assert torch.equal(ops.addim_hop_edm(net, x_t, sigma_t, sigma_s, denoised, 0.75), ops.ddim_hop_edm(net, x_t, sigma_t, sigma_s))


def test_addim_step_adds_the_conditional_variance_to_the_squared_norm():
    # Eq. 12-14: with the prediction orthogonal to its noise estimate, |x_s|^2 grows by exactly
    # tr(Var[x_s | x_t]) = d * (1 - sigma_s/sigma_t)^2 * x_var over the DDIM step.
    x_pred = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, -1.0, 2.0, 0.0]], dtype=torch.float64).reshape(2, 1, 2, 2)
    noise = torch.tensor([[0.0, 1.0, -2.0, 0.5], [4.0, 0.0, 0.0, 1.5]], dtype=torch.float64).reshape(2, 1, 2, 2)
    sigma_t, sigma_s = torch.tensor([1.5, 0.8], dtype=torch.float64), torch.tensor([0.5, 0.1], dtype=torch.float64)
    x_t = x_pred + sigma_t.reshape(-1, 1, 1, 1) * noise
    x_var = torch.tensor([0.2, 0.05], dtype=torch.float64)
    addim = ops.addim_step_edm(x_t, x_pred, sigma_t, sigma_s, x_var)
    ddim = ops.ddim_step_edm(x_t, x_pred, sigma_t, sigma_s)
    gained = addim.flatten(1).square().sum(1) - ddim.flatten(1).square().sum(1)
    torch.testing.assert_close(gained, 4 * (1 - sigma_s / sigma_t) ** 2 * x_var, rtol=1e-12, atol=1e-12)
    # Only the noise part changes: the step stays on the line through x_pred and x_t.
    direction = (addim - x_pred).flatten(1) / (addim - x_pred).flatten(1).norm(dim=1, keepdim=True)
    torch.testing.assert_close(direction, noise.flatten(1) / noise.flatten(1).norm(dim=1, keepdim=True))


def test_one_evaluation_solvers_check_their_inputs():
    x_t, y, sigma_t, sigma_s = solver_inputs()
    net = GaussianDenoiser()
    zero_t = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match=r'ddim_hop_edm: sigma_t must be positive.*samples \[1\]'):
        ops.ddim_hop_edm(net, x_t, zero_t, sigma_s)
    with pytest.raises(ValueError, match=r'addim_hop_edm: sigma_t must be positive.*samples \[1\]'):
        ops.addim_hop_edm(net, x_t, zero_t, sigma_s, y, 0.75)
    with pytest.raises(ValueError, match=r'addim_hop_edm: eta must lie in \[0, 1\], got 1.5'):
        ops.addim_hop_edm(net, x_t, sigma_t, sigma_s, y, 1.5)
    with pytest.raises(ValueError, match=r'addim_step_edm: x_var must be >= 0.*samples \[2\]'):
        ops.addim_step_edm(x_t, y, sigma_t, sigma_s, torch.tensor([0.1, 0.0, -0.1], dtype=torch.float64))
    # Unchecked, the values are the same.
    assert torch.equal(ops.ddim_hop_edm(net, x_t, sigma_t, sigma_s, check=False), ops.ddim_hop_edm(net, x_t, sigma_t, sigma_s))
    assert torch.equal(ops.addim_hop_edm(net, x_t, sigma_t, sigma_s, y, 0.75, check=False),
        ops.addim_hop_edm(net, x_t, sigma_t, sigma_s, y, 0.75))


@pytest.mark.parametrize('device', DEVICES)
def test_ddim_hop_is_first_order_on_gaussian_data(device):
    errors = gaussian_hop_errors(ops.ddim_hop_edm, device)
    # Local error of a 1st-order method is O(h^2): halving the hop shrinks it about 4x.
    assert 3 < errors[0] / errors[1] < 5.5
