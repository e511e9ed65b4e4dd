"""Tests for training/loss_cd.py: parity with the EDM reference, synchronised dropout, pickling, resume."""

import copy
import json
import math
import pickle

import numpy as np
import pytest
import torch

import dnnlib
from helpers import AnalyticStudent, AnalyticTeacher, load_fixture, run_script, tiny_precond, torchrun, weight_versions
from torch_utils import distributed as dist
from torch_utils import training_stats
from training import consistency_ops
from training import loss_cd
from training.loss_cd import (EDMConsistencyDistillLoss, LOSS_WEIGHTS, device_rng_state, loss_weight,
    synchronised_student_pass)
from training.networks_edm2 import suppress_inplace_weight_norm

# The analytic networks of the parity fixtures are helpers.AnalyticTeacher and AnalyticStudent; the tiny EDM2
# networks are helpers.tiny_precond (unit gains, so that the U-Net and its dropout are on).

pytestmark = pytest.mark.usefixtures('single_thread')


@pytest.fixture(scope='module')
def ref():
    return load_fixture('loss')


def fixture_edges(ref):
    return {key[len('edge__'):]: torch.from_numpy(value) for key, value in ref.items() if key.startswith('edge__')}


def parity_loss(ref, **kwargs):
    T = int(ref['T_target'])
    return EDMConsistencyDistillLoss(AnalyticTeacher(), S=int(ref['S']), T_start=T, T_end=T, report_stats=False, **kwargs)


#----------------------------------------------------------------------------
# Parity with the reference (shared/parity/loss.npz).

@pytest.mark.parametrize('sync_dropout', [True, False])
@pytest.mark.parametrize('terminal_teacher_hop', [False, True])
@pytest.mark.parametrize('loss_type', ['huber', 'l2', 'l2_root', 'pseudo_huber'])
def test_loss_from_edges_matches_reference(ref, loss_type, terminal_teacher_hop, sync_dropout):
    atol = dict(huber=1e-9, l2=1e-6, l2_root=1e-5, pseudo_huber=1e-5)[loss_type]
    y, eps = torch.from_numpy(ref['y']), torch.from_numpy(ref['eps'])
    for weight_mode in ['edm', 'sqrt_karras', 'flat', 'karras', 'snr']:
        loss_fn = parity_loss(ref, loss_type=loss_type, weight_mode=weight_mode, sync_dropout=sync_dropout,
            terminal_teacher_hop=terminal_teacher_hop)
        loss = loss_fn.loss_from_edges(AnalyticStudent().eval(), y, None, fixture_edges(ref), eps)
        expected = ref[f'loss__tth{int(terminal_teacher_hop)}__{loss_type}__{weight_mode}']
        assert loss.dtype == torch.float32 and loss.shape == expected.shape
        weight = ref[f'weight__{weight_mode}'].reshape(-1, 1, 1, 1)
        np.testing.assert_allclose(loss.numpy() / weight, expected / weight, rtol=1e-5, atol=atol)


@pytest.mark.parametrize('weight_mode', sorted(LOSS_WEIGHTS))
def test_loss_weights_match_reference(ref, weight_mode):
    weight = loss_weight(torch.from_numpy(ref['edge__sigma_t']), weight_mode, sigma_data=0.5)
    assert weight.dtype == torch.float32 and weight.shape == (12, 1, 1, 1)
    np.testing.assert_allclose(weight.flatten().numpy(), ref[f'weight__{weight_mode}'], rtol=1e-6)


def test_parity_loss_counts_and_reports_edge_classes(ref):
    loss_fn = parity_loss(ref)
    loss_fn.report_stats = True
    collector = training_stats.Collector(regex='CD/.*')
    collector.update()
    loss_fn.loss_from_edges(AnalyticStudent(), torch.from_numpy(ref['y']), None, fixture_edges(ref),
        torch.from_numpy(ref['eps']))
    collector.update()
    assert dict(loss_fn.edge_counts) == dict(terminal=2, boundary=4, general=6, total=12)
    assert collector.mean('CD/frac_terminal') == pytest.approx(2 / 12)
    assert collector.mean('CD/frac_general') == pytest.approx(6 / 12)
    assert collector.mean('CD/sigma_t') == pytest.approx(ref['edge__sigma_t'].mean(), rel=1e-6)
    assert collector.mean('CD/sigma_s') == pytest.approx(ref['sigma_s_eff'].mean(), rel=1e-6)
    assert collector.mean('CD/gain_mean') == pytest.approx(ref['gain'].mean(), rel=1e-5)
    assert collector.num('CD/gain_boundary_mean') == 4
    assert collector.mean('CD/gain_terminal_mean') == pytest.approx(1.0)


def test_degenerate_sigma_pair_is_reported_with_its_sigmas(ref):
    edges = fixture_edges(ref)
    # Row 1 is a boundary snap: put sigma_t onto its boundary, where the inverse DDIM step is undefined.
    edges['sigma_t'] = edges['sigma_t'].clone()
    edges['sigma_t'][1] = edges['sigma_bdry'][1]
    with pytest.raises(ValueError, match=r'degenerate.*sample 1 .*sigma_t=' + repr(float(edges['sigma_bdry'][1]))):
        parity_loss(ref).loss_from_edges(AnalyticStudent(), torch.from_numpy(ref['y']), None, edges,
            torch.from_numpy(ref['eps']))


def test_non_terminal_hop_to_zero_is_rejected_before_the_teacher_runs(ref):
    edges = fixture_edges(ref)
    general = int((~edges['is_terminal'] & ~edges['is_boundary_snap']).nonzero()[0])
    for name in ('sigma_s', 'sigma_bdry'):
        edges[name] = edges[name].clone()
        edges[name][general] = 0
    with pytest.raises(ValueError, match=rf'hop to sigma = 0\).*sample {general} \(general edge'):
        parity_loss(ref).loss_from_edges(AnalyticStudent(), torch.from_numpy(ref['y']), None, edges,
            torch.from_numpy(ref['eps']))


def test_broken_sigma_ordering_is_rejected(ref):
    edges = fixture_edges(ref)
    edges['sigma_s'] = edges['sigma_s'].clone()
    edges['sigma_s'][4] = edges['sigma_t'][4] * 2  # a general edge that goes up in sigma
    with pytest.raises(ValueError, match=r'ordering.*sample 4 \(general edge, segment j=2'):
        parity_loss(ref).loss_from_edges(AnalyticStudent(), torch.from_numpy(ref['y']), None, edges,
            torch.from_numpy(ref['eps']))

#----------------------------------------------------------------------------
# Teacher solvers (docs/algorithm.md §8.5): heun is the reference's hop; ddim and addim take one step
# with one teacher evaluation. Written out here from the formulas, independently of consistency_ops.

def hand_written_hop(solver, teacher, eta=0.75):
    """ode_hop of the given one-evaluation solver, spelled out per sample in float64 NumPy."""
    def hop(x_t, sigma_t, sigma_s, labels, images, noise):
        denoised = teacher(x_t.float(), sigma_t).double().numpy()
        out = np.empty_like(denoised)
        for i in range(len(out)):
            t, s, x, D = float(sigma_t[i]), float(sigma_s[i]), x_t[i].numpy(), denoised[i]
            eps_hat = (x - D) / t
            if solver == 'ddim':
                out[i] = D + s * eps_hat
            else:  # Heek et al. 2024, Eq. 14 with alpha = 1 and x_var = eta |D - y|^2 / d
                d = x.size
                x_var = eta * np.sum((D - images[i].numpy()) ** 2) / d
                out[i] = D + np.sqrt(s ** 2 + d * (1 - s / t) ** 2 * x_var / np.sum(eps_hat ** 2)) * eps_hat
        return torch.from_numpy(out)
    return hop


class RowCounter(AnalyticTeacher):
    """The analytic teacher, counting the rows it evaluates."""
    rows = 0

    def forward(self, x, sigma, class_labels=None, **kwargs):
        self.rows += len(x)
        return super().forward(x, sigma, class_labels)


def test_heun_solver_is_the_default_and_keeps_the_reference_loss(ref):
    y, eps, edges = torch.from_numpy(ref['y']), torch.from_numpy(ref['eps']), fixture_edges(ref)
    default = parity_loss(ref)
    assert default.teacher_solver == 'heun' and default.hyperparameters()['teacher_solver'] == 'heun'
    explicit = parity_loss(ref, teacher_solver='heun').loss_from_edges(AnalyticStudent(), y, None, edges, eps)
    assert torch.equal(explicit, default.loss_from_edges(AnalyticStudent(), y, None, edges, eps))
    expected = ref['loss__tth0__pseudo_huber__sqrt_karras']
    weight = ref['weight__sqrt_karras'].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(explicit.numpy() / weight, expected / weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('solver, kwargs', [('ddim', {}), ('addim', {}), ('addim', dict(addim_eta=0.3))])
@pytest.mark.parametrize('loss_type', ['pseudo_huber', 'l2'])
def test_one_evaluation_solvers_match_a_hand_written_hop(ref, solver, kwargs, loss_type):
    y, eps, edges = torch.from_numpy(ref['y']), torch.from_numpy(ref['eps']), fixture_edges(ref)
    loss_fn = parity_loss(ref, teacher_solver=solver, loss_type=loss_type, **kwargs)
    loss = loss_fn.loss_from_edges(AnalyticStudent(), y, None, edges, eps)
    by_hand = parity_loss(ref, loss_type=loss_type)
    by_hand.ode_hop = hand_written_hop(solver, AnalyticTeacher(), **({'eta': kwargs['addim_eta']} if kwargs else {}))
    expected = by_hand.loss_from_edges(AnalyticStudent(), y, None, edges, eps)
    # The targets carry gains up to ~1e3 (boundary snaps), so allow for the float64 rounding order.
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    heun = parity_loss(ref, loss_type=loss_type).loss_from_edges(AnalyticStudent(), y, None, edges, eps)
    non_terminal = ~edges['is_terminal']
    assert not torch.allclose(loss[non_terminal], heun[non_terminal], rtol=1e-3)  # the option changes the target
    torch.testing.assert_close(loss[~non_terminal], heun[~non_terminal], rtol=0, atol=0)  # terminal rows: no hop


def test_teacher_evaluations_per_edge(ref):
    y, eps, edges = torch.from_numpy(ref['y']), torch.from_numpy(ref['eps']), fixture_edges(ref)
    non_terminal = int((~edges['is_terminal']).sum())
    for solver, evaluations in [('heun', 2), ('ddim', 1), ('addim', 1)]:
        teacher = RowCounter()
        T = int(ref['T_target'])
        loss_fn = EDMConsistencyDistillLoss(teacher, S=int(ref['S']), T_start=T, T_end=T, report_stats=False,
            teacher_solver=solver)
        loss_fn.loss_from_edges(AnalyticStudent(), y, None, edges, eps)
        assert teacher.rows == evaluations * non_terminal, solver
        assert loss_cd.TEACHER_EVALUATIONS[solver] == evaluations


def test_addim_without_correction_gives_the_ddim_loss(ref):
    y, eps, edges = torch.from_numpy(ref['y']), torch.from_numpy(ref['eps']), fixture_edges(ref)
    addim = parity_loss(ref, teacher_solver='addim', addim_eta=0.0).loss_from_edges(AnalyticStudent(), y, None, edges, eps)
    ddim = parity_loss(ref, teacher_solver='ddim').loss_from_edges(AnalyticStudent(), y, None, edges, eps)
    assert torch.equal(addim, ddim)


@pytest.mark.parametrize('kwargs, option, message', [
    (dict(teacher_solver='euler'), 'teacher_solver', r"teacher_solver must be one of \('heun', 'ddim', 'addim'\), got 'euler'"),
    (dict(teacher_solver=None), 'teacher_solver', 'teacher_solver must be one of'),
    (dict(teacher_solver='addim', addim_eta=1.5), 'addim_eta', r'addim_eta must lie in \[0, 1\], got 1.5'),
    (dict(teacher_solver='addim', addim_eta=-0.1), 'addim_eta', 'addim_eta must lie in'),
    (dict(teacher_solver='addim', addim_eta=float('nan')), 'addim_eta', 'addim_eta must lie in'),
    (dict(addim_eta=0.75), 'addim_eta', "addim_eta has no effect with teacher_solver='heun'"),
    (dict(teacher_solver='ddim', addim_eta=0.5), 'addim_eta', "addim_eta has no effect with teacher_solver='ddim'"),
])
def test_bad_teacher_solver_settings_are_refused(kwargs, option, message):
    with pytest.raises(dnnlib.UserError, match=message) as info:
        EDMConsistencyDistillLoss(None, **kwargs)
    assert info.value.option == option


def test_teacher_solver_is_a_hyperparameter_and_old_states_mean_heun(tmp_path):
    settings = dict(S=4, T_start=8, T_end=16)
    assert EDMConsistencyDistillLoss(None, teacher_solver='addim', **settings).hyperparameters()['addim_eta'] == 0.75
    assert 'teacher_solver' in EDMConsistencyDistillLoss.OPTIONS and 'addim_eta' in EDMConsistencyDistillLoss.OPTIONS
    heun = EDMConsistencyDistillLoss(AnalyticTeacher(), **settings)
    heun.set_progress(4000)
    state = heun.state_dict()
    for name in ('teacher_solver', 'addim_eta'):  # a training state from before the option existed
        del state['hyperparameters'][name]
    resumed = EDMConsistencyDistillLoss(AnalyticTeacher(), **settings)
    resumed.load_state_dict(state)
    assert resumed.progress_kimg == 4
    for change in [dict(teacher_solver='ddim'), dict(teacher_solver='addim'), dict(teacher_solver='addim', addim_eta=0.5)]:
        with pytest.raises(dnnlib.UserError, match=f'{"addim_eta" if "addim_eta" in change else "teacher_solver"}: checkpoint'):
            EDMConsistencyDistillLoss(AnalyticTeacher(), **settings, **change).load_state_dict(state)
    addim = EDMConsistencyDistillLoss(AnalyticTeacher(), teacher_solver='addim', **settings)
    with pytest.raises(dnnlib.UserError, match="addim_eta: checkpoint 0.75, now 0.5"):
        EDMConsistencyDistillLoss(AnalyticTeacher(), teacher_solver='addim', addim_eta=0.5, **settings).load_state_dict(
            addim.state_dict())


def test_a_higher_last_student_node_moves_the_student_grid_only():
    settings = dict(S=4, T_start=16, T_end=16)
    default, raised = EDMConsistencyDistillLoss(AnalyticTeacher(), **settings), EDMConsistencyDistillLoss(
        AnalyticTeacher(), student_sigma_min=0.6, **settings)
    assert default.student_sigma_min == default.sigma_min == 0.002
    nodes = raised.student_sigmas()
    assert torch.equal(nodes, consistency_ops.make_edge_grid(4, 0.6, 80, 7)) and nodes[-2] == pytest.approx(0.6)
    grids = raised.grids(16)
    assert grids.teacher[-2] == pytest.approx(0.002) and grids.terminal_k == grids.T_eff - 1
    # Samplers and validation take the student's grid from the 'cd' entry; the teacher grid is the loss's own.
    cd = raised.snapshot_entries()['cd']
    assert cd.sigma_min == 0.6 and cd.student_sigmas == nodes.tolist() and cd.loss_kwargs['sigma_min'] == 0.002
    assert raised.validation_baselines(heun=False)[0].sampler_kwargs['sigma_min'] == 0.6
    # Every drawn edge ends at or above its segment's boundary, a student node; the last segment reaches 0.
    torch.manual_seed(0)
    edges, _ = raised.draw_edges(torch.zeros(4096, 1, 1, 1), grids)
    assert set(edges['sigma_bdry'].unique().tolist()) <= set(nodes.tolist())
    last = edges['step_j'] == 3
    assert last.any() and (edges['sigma_t'][last] <= 0.6).all() and (edges['sigma_bdry'][last] == 0).all()
    assert (edges['sigma_t'][edges['is_terminal']] == grids.teacher[-2]).all() and edges['is_terminal'][last].any()
    loss = raised(AnalyticStudent(), torch.randn(64, 3, 8, 8))
    assert torch.isfinite(loss).all()
    # Training states from before the option had the student's last node at sigma_min.
    state = default.state_dict()
    del state['hyperparameters']['student_sigma_min']
    EDMConsistencyDistillLoss(AnalyticTeacher(), **settings).load_state_dict(state)
    with pytest.raises(dnnlib.UserError, match='student_sigma_min: checkpoint 0.002, now 0.6'):
        EDMConsistencyDistillLoss(AnalyticTeacher(), student_sigma_min=0.6, **settings).load_state_dict(state)
    # So had losses pickled before it.
    old_pickle = {name: value for name, value in default.__getstate__().items() if name != 'student_sigma_min'}
    unpickled = EDMConsistencyDistillLoss.__new__(EDMConsistencyDistillLoss)
    unpickled.__setstate__(old_pickle)
    assert unpickled.student_sigma_min == 0.002 and torch.equal(unpickled.student_sigmas(), default.student_sigmas())

#----------------------------------------------------------------------------
# Synchronised dropout and the in-place weight normalisation of EDM2 networks.

def test_replayed_pass_reproduces_student_dropout_without_touching_weights():
    student = tiny_precond(seed=1, dropout=0.1).train()
    x, sigma = torch.randn(6, 3, 8, 8), torch.tensor([0.05, 0.3, 1.0, 2.0, 7.0, 40.0], dtype=torch.float64)
    state = device_rng_state(x.device)
    prediction = student(x, sigma.reshape(-1, 1, 1, 1))
    weights = {name: param.detach().clone() for name, param in student.named_parameters()}
    versions = weight_versions(student)

    replayed = synchronised_student_pass(student, x, sigma, None, x.device, state)
    assert torch.equal(replayed, prediction.detach())
    with torch.no_grad():
        fresh_masks = synchronised_student_pass(student, x, sigma, None, x.device, device_rng_state(x.device))
    assert not torch.equal(fresh_masks, prediction.detach())  # so dropout is really active here
    assert weight_versions(student) == versions
    assert all(torch.equal(param, weights[name]) for name, param in student.named_parameters())

    prediction.square().sum().backward()  # fails if a pass in between rewrote saved weights in place
    assert student.unet.out_conv.weight.grad.abs().sum() > 0


def test_sync_dropout_target_uses_the_student_pass_masks():
    teacher, student = tiny_precond(seed=2), tiny_precond(seed=3, dropout=0.1).train()
    S, T = 4, 16
    loss_fn = EDMConsistencyDistillLoss(teacher, S=S, T_start=T, T_end=T, report_stats=False)
    grids = loss_fn.grids(T)
    k_all = torch.arange(grids.T_eff)
    j_all = torch.searchsorted(grids.bounds[:, 0].contiguous(), k_all, right=True) - 1
    k_t = k_all[grids.bounds[j_all, 1] > k_all][:6]  # edges that are not the last of their segment
    step_j = j_all[k_t]
    edges = dict(k_t=k_t, k_s=k_t + 1, step_j=step_j, n_rel=grids.bounds[step_j, 1] - k_t + 1,
        sigma_t=grids.teacher[k_t], sigma_s=grids.teacher[k_t + 1], sigma_bdry=grids.student[step_j + 1],
        is_terminal=torch.zeros(6, dtype=torch.bool), is_boundary_snap=torch.zeros(6, dtype=torch.bool))
    assert len(k_t) == 6 and (edges['n_rel'] >= 2).all()
    images, noise = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)

    # Expected, spelled out: same seed for the student's pass and for the target pass at (x_s, sigma_s).
    manual = copy.deepcopy(student)
    sigma_t, sigma_s, sigma_bdry = edges['sigma_t'], edges['sigma_s'], edges['sigma_bdry']
    x_t = images.double() + sigma_t.reshape(-1, 1, 1, 1) * noise.double()
    x_s = consistency_ops.heun_hop_edm(teacher, x_t, sigma_t, sigma_s)
    torch.manual_seed(5)
    x_hat_t = manual(x_t.float(), sigma_t.reshape(-1, 1, 1, 1))
    torch.manual_seed(5)
    with torch.no_grad(), suppress_inplace_weight_norm(manual):
        h = manual(x_s.float(), sigma_s.reshape(-1, 1, 1, 1)).double()
    x_r = h + (sigma_bdry / sigma_s).reshape(-1, 1, 1, 1) * (x_s - h)
    target = consistency_ops.inv_ddim_edm(x_r, x_t, sigma_t, sigma_bdry).float()
    c_out = sigma_t.float() * 0.5 / (sigma_t.float() ** 2 + 0.25).sqrt()
    expected = ((x_hat_t - target).square().sum(dim=[1, 2, 3]) + 1e-8).sqrt() - 1e-4
    expected = expected / c_out

    torch.manual_seed(5)
    synced = loss_fn.loss_from_edges(student, images, None, edges, noise)
    torch.testing.assert_close(synced.flatten(), expected.detach(), rtol=1e-5, atol=1e-6)
    loss_fn.sync_dropout = False
    torch.manual_seed(5)
    unsynced = loss_fn.loss_from_edges(student, images, None, edges, noise)
    assert not torch.allclose(unsynced, synced, rtol=1e-3)


def test_loss_call_rewrites_student_weights_once_and_backward_works():
    teacher, student = tiny_precond(seed=4), tiny_precond(seed=5, dropout=0.1).train()
    loss_fn = EDMConsistencyDistillLoss(teacher, S=4, T_start=8, T_end=8, report_stats=False)
    versions = weight_versions(student)
    torch.manual_seed(0)
    loss = loss_fn(student, torch.randn(8, 3, 8, 8))
    # Only the student's own forward applies the forced weight normalisation (one in-place write).
    assert weight_versions(student) == {name: version + 1 for name, version in versions.items()}
    loss.sum().backward()
    assert student.unet.enc['8x8_conv'].weight.grad.abs().sum() > 0

#----------------------------------------------------------------------------
# End to end, pickling, annealing, checkpoints.

def test_pseudo_huber_c_is_the_distance_constant(ref):
    # Same edges and student, so the squared error norm n^2 is shared: d_c = sqrt(n^2 + c^2) - c for both c.
    y, eps, edges = torch.from_numpy(ref['y']), torch.from_numpy(ref['eps']), fixture_edges(ref)
    weight = ref['weight__sqrt_karras'].reshape(-1, 1, 1, 1)
    default = parity_loss(ref, weight_mode='sqrt_karras').loss_from_edges(AnalyticStudent(), y, None, edges, eps)
    wide = parity_loss(ref, weight_mode='sqrt_karras', pseudo_huber_c=0.5).loss_from_edges(AnalyticStudent(), y, None, edges, eps)
    squared_norm = (default.double().numpy() / weight + 1e-4) ** 2 - 1e-8
    np.testing.assert_allclose(wide.double().numpy() / weight, np.sqrt(squared_norm + 0.25) - 0.5, rtol=1e-4, atol=1e-7)
    assert not np.allclose(wide.numpy(), default.numpy())


@pytest.mark.parametrize('loss_type, shape', [('pseudo_huber', (5, 1, 1, 1)), ('huber', (5, 3, 8, 8))])
def test_call_end_to_end_on_tiny_networks(loss_type, shape):
    teacher, student = tiny_precond(seed=6, label_dim=2), tiny_precond(seed=7, label_dim=2).train()
    teacher_before = copy.deepcopy(teacher.state_dict())
    loss_fn = EDMConsistencyDistillLoss(teacher, S=4, T_start=8, T_end=32, T_anneal_kimg=1, loss_type=loss_type)
    labels = torch.eye(2)[torch.tensor([0, 1, 1, 0, 1])]
    torch.manual_seed(0)
    loss = loss_fn(net=student, images=torch.randn(5, 3, 8, 8), labels=labels)
    assert loss.shape == shape and loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.sum().backward()
    grads = [param.grad for name, param in student.named_parameters() if not name.startswith('logvar')]
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads)
    assert student.unet.emb_label.weight.grad.abs().sum() > 0
    assert not teacher.training and all(not param.requires_grad and param.grad is None for param in teacher.parameters())
    assert all(torch.equal(value, teacher_before[name]) for name, value in teacher.state_dict().items())
    assert loss_fn.edge_counts.total == 5


def test_pickle_drops_teacher_and_reattached_loss_matches(ref):
    loss_fn = parity_loss(ref)
    y, eps, edges = torch.from_numpy(ref['y']), torch.from_numpy(ref['eps']), fixture_edges(ref)
    before = loss_fn.loss_from_edges(AnalyticStudent(), y, None, edges, eps)
    loss_fn.grids(int(ref['T_target']))
    assert loss_fn._grid_cache and loss_fn._student_grid is not None  # caches must not travel either

    data = pickle.dumps(loss_fn)
    assert b'AnalyticTeacher' not in data and b'_modules' not in data
    restored = pickle.loads(data)
    assert restored.teacher_net is None and not restored._grid_cache and restored._student_grid is None
    assert loss_fn.teacher_net is not None and restored.hyperparameters() == loss_fn.hyperparameters()
    with pytest.raises(RuntimeError, match='attach_teacher'):
        restored.loss_from_edges(AnalyticStudent(), y, None, edges, eps)
    after = restored.attach_teacher(AnalyticTeacher()).loss_from_edges(AnalyticStudent(), y, None, edges, eps)
    assert torch.equal(after, before)


def test_annealed_T_follows_set_progress():
    T_start, T_end, horizon = 8, 40, 100.0
    loss_fn = EDMConsistencyDistillLoss(AnalyticTeacher(), S=4, T_start=T_start, T_end=T_end, T_anneal_kimg=horizon)
    collector = training_stats.Collector(regex='CD/T_.*')
    for kimg in [-3, 0, 10, 37.5, 50, 99.9, 100, 250]:
        ratio = min(max(kimg / horizon, 0), 1)
        expected = min(max(round(T_start * (T_end / T_start) ** ratio), T_start), T_end)
        loss_fn.set_progress(kimg * 1000)
        assert loss_fn.current_teacher_edges() == expected
        collector.update()
        torch.manual_seed(0)
        loss_fn(AnalyticStudent(), torch.randn(4, 3, 8, 8))
        collector.update()
        assert collector.mean('CD/T_target') == expected
        # When S - 1 = 3 divides T - 1 the interior student nodes are teacher nodes too: one edge more.
        assert collector.mean('CD/T_edges') == expected + (1 if (expected - 1) % 3 == 0 else 0)


def test_checkpoint_restores_progress_and_refuses_other_settings(tmp_path):
    loss_fn = EDMConsistencyDistillLoss(AnalyticTeacher(), S=4, T_start=8, T_end=16)
    loss_fn.set_progress(12500)
    torch.manual_seed(0)
    loss_fn(AnalyticStudent(), torch.randn(4, 3, 8, 8))
    path = str(tmp_path / 'training-state-0000000.pt')
    dist.CheckpointIO(loss_fn=loss_fn).save(path, verbose=False)
    assert 'AnalyticTeacher' not in str(torch.load(path, weights_only=False))

    teacher = AnalyticTeacher()
    resumed = EDMConsistencyDistillLoss(teacher, S=4, T_start=8, T_end=16)
    dist.CheckpointIO(loss_fn=resumed).load(path, verbose=False)
    assert resumed.progress_kimg == 12.5 and resumed.edge_counts == loss_fn.edge_counts
    assert resumed.teacher_net is teacher

    for change in [dict(S=2), dict(loss_type='l2'), dict(T_end=32), dict(teacher_solver='ddim'), dict(student_sigma_min=0.5)]:
        other = EDMConsistencyDistillLoss(AnalyticTeacher(), **{**dict(S=4, T_start=8, T_end=16), **change})
        name = next(iter(change))
        with pytest.raises(ValueError, match=f'{name}: checkpoint'):
            dist.CheckpointIO(loss_fn=other).load(path, verbose=False)
        assert other.progress_kimg == 0


@pytest.mark.parametrize('kwargs, message', [
    (dict(S=8, T_start=7), 'T_start must be >= S'),
    (dict(T_start=256, T_end=128), 'T_end must be >= T_start'),
    (dict(loss_type='l1'), "loss_type must be one of .*'l1'"),
    (dict(weight_mode='cosine'), "weight_mode must be one of .*'cosine'"),
    (dict(sampling_mode='lognormal'), "sampling_mode must be one of"),
    (dict(sigma_min=0), 'sigma_min'),
    (dict(student_sigma_min=0.001), 'student_sigma_min'),
    (dict(student_sigma_min=80), 'student_sigma_min'),
])
def test_invalid_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EDMConsistencyDistillLoss(None, **kwargs)


@pytest.mark.parametrize('kwargs, option', [
    (dict(sampling_mode='uniform', terminal_anchor=True), 'terminal_anchor'),
    (dict(sampling_mode='uniform', terminal_anchor=False), 'terminal_anchor'),
    (dict(sampling_mode='vp', P_mean=-1.0), 'P_mean'),
    (dict(sampling_mode='uniform', P_std=2.0), 'P_std'),
])
def test_settings_a_sampling_mode_does_not_read_are_refused(kwargs, option):
    with pytest.raises(dnnlib.UserError, match=f'{option} has no effect') as info:
        EDMConsistencyDistillLoss(None, **kwargs)
    assert info.value.option == option


def test_sampling_mode_defaults():
    assert EDMConsistencyDistillLoss(None, sampling_mode='uniform').terminal_anchor is False
    loss = EDMConsistencyDistillLoss(None, sampling_mode='edm')
    assert (loss.terminal_anchor, loss.P_mean, loss.P_std) == (True, -1.2, 1.2)

#----------------------------------------------------------------------------
# DDP-wrapped student under torchrun (gloo on CPU).

_DDP_WORKER = r'''
import json, sys
import torch
from torch_utils import distributed as dist
from training.loss_cd import EDMConsistencyDistillLoss
from helpers import tiny_precond, weight_versions
dist.init()
teacher, student = tiny_precond(seed=0), tiny_precond(seed=1, dropout=0.1).train()
student.logvar_linear.requires_grad_(False)  # CD never trains the uncertainty head
ddp = torch.nn.parallel.DistributedDataParallel(student, broadcast_buffers=False, find_unused_parameters=False)
loss_fn = EDMConsistencyDistillLoss(teacher, S=4, T_start=8, T_end=8, report_stats=False)
versions = weight_versions(student)
torch.manual_seed(dist.get_rank())
loss = loss_fn(ddp, torch.randn(4, 3, 8, 8))
bumps = sorted({weight_versions(student)[name] - version for name, version in versions.items()})
loss.sum().backward()
grad = student.unet.out_conv.weight.grad
with open(sys.argv[1] + '/rank%d.json' % dist.get_rank(), 'w') as f:
    json.dump(dict(bumps=bumps, loss=float(loss.sum()), grad=grad.flatten()[:8].tolist()), f)
'''


@pytest.mark.slow
def test_ddp_wrapped_student(tmp_path):
    script = tmp_path / 'ddp_worker.py'
    script.write_text(_DDP_WORKER)
    run_script(script, tmp_path, launcher=torchrun())  # script_env() makes helpers importable
    results = [json.loads((tmp_path / f'rank{rank}.json').read_text()) for rank in range(2)]
    for result in results:
        assert result['bumps'] == [1] and math.isfinite(result['loss'])
    assert results[0]['loss'] != results[1]['loss']  # different data per rank ...
    np.testing.assert_allclose(results[0]['grad'], results[1]['grad'], rtol=1e-6)  # ... averaged gradients

#----------------------------------------------------------------------------
