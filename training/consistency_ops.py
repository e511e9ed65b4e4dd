"""Sigma grids, edge sampling and ODE steps for multistep consistency distillation (MSCD).

Pure tensor math in EDM's sigma-as-time parameterisation, x_sigma = y + sigma * eps. The student
grid s (S Karras nodes, then 0) cuts the sigma axis into S segments; the denser teacher grid tau
(T_eff Karras nodes, then 0) supplies the edges tau[k] -> tau[k+1] that the teacher integrates.
Section numbers (§n) refer to docs/algorithm.md. Grids are float64, built on the CPU; callers move
them to their device.
"""

import math

import torch

#----------------------------------------------------------------------------
# Grids (docs/algorithm.md §2-§4).

def make_karras_sigmas(num_nodes, sigma_min, sigma_max, rho, round_fn=None):
    """Karras et al. noise levels, float64 on the CPU, from sigma_max down to sigma_min (no trailing 0)."""
    if num_nodes < 1:
        raise ValueError(f'make_karras_sigmas: num_nodes must be >= 1, got {num_nodes}')
    if not 0 <= sigma_min <= sigma_max or rho <= 0:
        raise ValueError(f'make_karras_sigmas: expected 0 <= sigma_min <= sigma_max and rho > 0, '
            f'got sigma_min={sigma_min}, sigma_max={sigma_max}, rho={rho}')
    top = float(sigma_max) ** (1 / rho)
    bottom = float(sigma_min) ** (1 / rho)
    ramp = torch.arange(num_nodes, dtype=torch.float64) / max(num_nodes - 1, 1)
    sigmas = (top + ramp * (bottom - top)) ** rho
    if round_fn is not None:
        sigmas = torch.as_tensor(round_fn(sigmas), dtype=torch.float64)
    return sigmas


def make_edge_grid(num_edges, sigma_min, sigma_max, rho):
    """Karras nodes followed by 0, i.e. a grid of num_edges edges ending at sigma = 0 (float64, CPU)."""
    nodes = make_karras_sigmas(num_edges, sigma_min, sigma_max, rho)
    return torch.cat([nodes, nodes.new_zeros(1)])


def filter_teacher_edges_by_sigma(student_sigmas, teacher_sigmas, eps=1e-5):
    """Drop teacher edges whose upper sigma coincides with an interior student node.

    Interior nodes are the positive student nodes after the first (sigma_min included). A teacher
    node tau is a match of node s when |tau - s| <= eps * max(1, |tau|, |s|) + eps * |s|; edge 0 and
    the terminal edge are always kept. Returns (kept upper sigmas + the final entry, terminal index).
    """
    student = student_sigmas.to(device=teacher_sigmas.device, dtype=teacher_sigmas.dtype)
    interior = student[1:][student[1:] > 0]
    tops = teacher_sigmas[:-1]
    num_edges = tops.numel()
    if num_edges < 1:
        raise ValueError(f'filter_teacher_edges_by_sigma: teacher_sigmas needs at least 2 entries, '
            f'got {teacher_sigmas.tolist()}')

    ends_at_zero = ((tops > 0) & (teacher_sigmas[1:] == 0)).nonzero().flatten()
    terminal = int(ends_at_zero[-1]) if len(ends_at_zero) else num_edges - 1

    tau, s = tops[:, None].abs(), interior[None, :].abs()
    tolerance = eps * torch.maximum(torch.maximum(tau, s), torch.ones_like(tau)) + eps * s
    keep = ~((tops[:, None] - interior[None, :]).abs() <= tolerance).any(dim=1)
    keep[0] = True
    keep[terminal] = True
    grid = torch.cat([tops[keep], teacher_sigmas[-1:]])
    return grid, int(keep.sum()) - 1


def inflate_teacher_grid(student_sigmas, T, sigma_min, sigma_max, rho):
    """Filtered Karras teacher grid with at least T edges: (grid, terminal_k, raw node count used).

    Tries raw = T, T+1, ... nodes and stops at the first whose filtered grid still has >= T edges,
    so T_eff = len(grid) - 1 can exceed T (e.g. S = 8, T = 64 gives 65).
    """
    if T < 1:
        raise ValueError(f'inflate_teacher_grid: the target number of teacher edges T must be >= 1, got {T}')
    raw = T
    while True:
        grid, terminal_k = filter_teacher_edges_by_sigma(student_sigmas, make_edge_grid(raw, sigma_min, sigma_max, rho))
        if len(grid) - 1 >= T:
            return grid, terminal_k, raw
        raw += 1


def build_student_teacher_grids(S, T, sigma_min, sigma_max, rho, student_sigma_min=None):
    """(student grid of S edges, inflated teacher grid for target T, its terminal edge index), float64 CPU.

    The student's last node is student_sigma_min (None: sigma_min); the teacher grid always runs down to
    sigma_min, so a higher last student node leaves the teacher's low-noise edges in the last segment.
    """
    if S < 1:
        raise ValueError(f'build_student_teacher_grids: the number of student steps S must be >= 1, got {S}')
    student_sigmas = make_edge_grid(S, sigma_min if student_sigma_min is None else student_sigma_min, sigma_max, rho)
    teacher_sigmas, terminal_k, _raw = inflate_teacher_grid(student_sigmas, T, sigma_min, sigma_max, rho)
    return student_sigmas, teacher_sigmas, terminal_k


def annealed_teacher_edges(kimg, T_start, T_end, T_anneal_kimg):
    """Target teacher edge count at training progress kimg: log-linear from T_start to T_end (§10)."""
    if T_anneal_kimg <= 0:
        return int(T_end)
    ratio = min(max(kimg / T_anneal_kimg, 0.0), 1.0)
    log_T = math.log(T_start) + ratio * (math.log(T_end) - math.log(T_start))
    T = int(round(math.exp(log_T)))  # Python's round: half to even, as in the reference.
    return min(max(T, int(T_start)), int(T_end))

#----------------------------------------------------------------------------
# Partition and edge sampling (docs/algorithm.md §5, §6).

def _check_non_increasing(name, sigmas):
    rises = (sigmas[1:] > sigmas[:-1]).nonzero().flatten()
    if len(rises):
        i = int(rises[0])
        raise ValueError(f'{name} must be non-increasing, but {name}[{i}] = {float(sigmas[i])} '
            f'< {name}[{i + 1}] = {float(sigmas[i + 1])}')


def partition_edges_by_sigma(student_sigmas, teacher_sigmas):
    """For each student segment j, the first and last teacher edge k with s[j+1] < tau[k] <= s[j]; (S, 2) int64.

    An empty segment falls back to the single edge whose upper sigma is nearest s[j+1].
    """
    _check_non_increasing('student_sigmas', student_sigmas)
    _check_non_increasing('teacher_sigmas', teacher_sigmas)
    student = student_sigmas.to(teacher_sigmas.device)
    upper, lower = student[:-1, None], student[1:, None]
    tops = teacher_sigmas[None, :-1]
    num_edges = tops.shape[1]

    member = (tops > lower) & (tops <= upper)
    edge_ids = torch.arange(num_edges, device=tops.device).expand_as(member)
    first = torch.where(member, edge_ids, num_edges).amin(dim=1)
    last = torch.where(member, edge_ids, -1).amax(dim=1)
    nearest = (tops - lower).abs().argmin(dim=1)
    empty = ~member.any(dim=1)
    return torch.stack([torch.where(empty, nearest, first), torch.where(empty, nearest, last)], dim=1)


def compute_importance_weights(teacher_sigmas, rho, mode='vp', P_mean=-1.2, P_std=1.2, terminal_anchor=True):
    """Float32 probability of drawing each teacher edge, from its upper sigma.

    vp: target density 1/(1 + sigma^2); edm: log-normal(P_mean, P_std); both times the Karras node
    spacing ~ sigma^(1 - 1/rho). uniform: equal weights. terminal_anchor (vp/edm only) gives the last
    edge exactly 1/T_eff, where T_eff is the edge count of the grid passed in.
    """
    sigma = teacher_sigmas[:-1].to(torch.float32)  # The reference works in float32.
    num_edges = sigma.numel()
    if mode == 'uniform':
        weights = torch.ones_like(sigma)
    elif mode == 'vp':
        weights = (sigma + 1e-10) ** (1 - 1 / rho) / (1 + sigma ** 2)
    elif mode == 'edm':
        z = (torch.log(sigma + 1e-10) - P_mean) / P_std
        weights = (sigma + 1e-10) ** (-1 / rho) * torch.exp(-0.5 * z ** 2)
    else:
        raise ValueError(f"sampling mode must be 'uniform', 'vp' or 'edm', got {mode!r}")
    probs = weights / weights.sum().clamp_min(1e-10)

    if terminal_anchor and mode != 'uniform' and num_edges > 1:
        rest = probs[:-1]
        rest = rest * (1 - 1 / num_edges) / rest.sum().clamp_min(1e-10)
        probs = torch.cat([rest, rest.new_full([1], 1 / num_edges)])
    return probs


def sample_segment_and_teacher_pair(sigma_bounds, teacher_sigmas, student_sigmas, batch_size, device,
        generator=None, terminal_k=None, sampling_mode='vp', rho=7.0, P_mean=-1.2, P_std=1.2, terminal_anchor=True,
        edge_probs=None):
    """Draw one teacher edge per sample and classify it; returns a dict of per-sample tensors.

    uniform picks a segment uniformly and then an edge uniformly inside it (so the terminal edge
    gets 1/S); vp/edm draw the edge from compute_importance_weights(), or from edge_probs, that
    function's result for this grid when the caller keeps it. n_rel counts edges from the
    drawn one down to its segment's end (1 = the edge just above sigma_bdry = s[j+1]).
    """
    bounds = sigma_bounds.to(device)
    teacher = teacher_sigmas.to(device)
    student = student_sigmas.to(device)
    num_segments, num_edges = bounds.shape[0], teacher.numel() - 1
    seg_start, seg_end = bounds[:, 0].contiguous(), bounds[:, 1].contiguous()
    seg_len = (seg_end - seg_start + 1).clamp_min(1)

    if sampling_mode == 'uniform':
        step_j = torch.randint(0, num_segments, (batch_size,), generator=generator, device=device)
        u = torch.empty(batch_size, dtype=torch.float32, device=device).uniform_(0, 1, generator=generator)
        length = seg_len[step_j].to(torch.float32)
        n_rel = torch.minimum(torch.floor(u * length + 1), length).to(torch.int64)
        k_t = seg_end[step_j] - (n_rel - 1)
    else:
        probs = edge_probs if edge_probs is not None else compute_importance_weights(
            teacher, rho, sampling_mode, P_mean, P_std, terminal_anchor)
        k_t = torch.multinomial(probs.to(device), batch_size, replacement=True, generator=generator)
        # Searching segment starts only is exact for contiguous partitions (§5: only T_eff < S breaks them).
        step_j = (torch.searchsorted(seg_start, k_t, right=True) - 1).clamp(0, num_segments - 1)
        n_rel = (seg_len[step_j] - (k_t - seg_start[step_j])).clamp_min(1)

    k_s = (k_t + 1).clamp_max(num_edges)
    is_terminal = k_t == (num_edges - 1 if terminal_k is None else terminal_k)
    return dict(
        step_j=step_j, n_rel=n_rel, k_t=k_t, k_s=k_s,
        sigma_t=teacher[k_t], sigma_s=teacher[k_s], sigma_bdry=student[step_j + 1],
        is_terminal=is_terminal,
        is_boundary_snap=~is_terminal & (n_rel == 1) & (step_j < num_segments - 1),
    )

#----------------------------------------------------------------------------
# ODE steps in EDM space (docs/algorithm.md §1, §8). Arithmetic is float64; results take x_t's dtype.
# check=False skips the input checks, which cost a host sync each, for callers that validated the sigmas.

def _sigma_like(sigma, x):
    """sigma as float64 on x's device, shaped to broadcast against x (a scalar stays 0-dim)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    return sigma if sigma.ndim == 0 else sigma.reshape(-1, *[1] * (x.ndim - 1))


def _raise_if_zero(func, name, sigma):
    zero = (sigma.flatten() == 0).nonzero().flatten()
    if len(zero):
        raise ValueError(f'{func}: {name} must be positive, but {name} = 0 for samples {zero.tolist()}')


def ddim_step_edm(x_t, x_pred_t, sigma_t, sigma_s, check=True):
    """Deterministic DDIM (Euler) step from sigma_t to sigma_s given the prediction x_pred_t made at sigma_t."""
    sigma_t, sigma_s = _sigma_like(sigma_t, x_t), _sigma_like(sigma_s, x_t)
    if check:
        _raise_if_zero('ddim_step_edm', 'sigma_t', sigma_t)
    x, x_pred = x_t.to(torch.float64), x_pred_t.to(torch.float64)
    return (x_pred + (sigma_s / sigma_t) * (x - x_pred)).to(x_t.dtype)


def inv_ddim_edm(x_ref, x_t, sigma_t, sigma_ref, check=True):
    """The prediction at sigma_t whose DDIM step from x_t lands exactly on x_ref at sigma_ref."""
    sigma_t, sigma_ref = _sigma_like(sigma_t, x_t), _sigma_like(sigma_ref, x_t)
    if check:
        _check_inverse_pair(sigma_t, sigma_ref)
    x_r, x = x_ref.to(torch.float64), x_t.to(torch.float64)
    return ((x_r * sigma_t - x * sigma_ref) / (sigma_t - sigma_ref)).to(x_t.dtype)


def _check_inverse_pair(sigma_t, sigma_ref):
    _raise_if_zero('inv_ddim_edm', 'sigma_t', sigma_t)
    gap = (sigma_t - sigma_ref).flatten()
    degenerate = (gap.abs() < 1e-12).nonzero().flatten()
    if len(degenerate):
        i = int(degenerate[0])
        pair_t = float(sigma_t.flatten()[i if sigma_t.numel() > 1 else 0])
        pair_ref = float(sigma_ref.flatten()[i if sigma_ref.numel() > 1 else 0])
        raise ValueError(f'inv_ddim_edm: degenerate sigma pair for samples {degenerate.tolist()}: '
            f'|sigma_t - sigma_ref| must be >= 1e-12, got sigma_t = {pair_t!r}, sigma_ref = {pair_ref!r}')


@torch.no_grad()
def heun_hop_edm(net, x_t, sigma_t, sigma_s, class_labels=None, check=True):
    """One Heun (2nd-order) step of the probability-flow ODE from sigma_t to sigma_s > 0 (two net calls).

    The ODE state is float64; the net gets float32 images and the sigmas as given, and its outputs
    are promoted back to float64.
    """
    sigma_t = torch.as_tensor(sigma_t, dtype=torch.float64, device=x_t.device)
    sigma_s = torch.as_tensor(sigma_s, dtype=torch.float64, device=x_t.device)
    if check:
        _raise_if_zero('heun_hop_edm', 'sigma_t', sigma_t)
        _raise_if_zero('heun_hop_edm', 'sigma_s', sigma_s)
    s_t, s_s = _sigma_like(sigma_t, x_t), _sigma_like(sigma_s, x_t)

    x = x_t.to(torch.float64)
    d_t = (x - net(x.to(torch.float32), sigma_t, class_labels).to(torch.float64)) / s_t
    x_euler = x + (s_s - s_t) * d_t
    d_s = (x_euler - net(x_euler.to(torch.float32), sigma_s, class_labels).to(torch.float64)) / s_s
    return (x + 0.5 * (s_s - s_t) * (d_t + d_s)).to(x_t.dtype)


@torch.no_grad()
def ddim_hop_edm(net, x_t, sigma_t, sigma_s, class_labels=None, check=True):
    """One DDIM (Euler) step of the probability-flow ODE from sigma_t to sigma_s (one net call):
    x_s = D + (sigma_s / sigma_t) * (x_t - D) with D = net(x_t; sigma_t), float64 as heun_hop_edm."""
    sigma_t = torch.as_tensor(sigma_t, dtype=torch.float64, device=x_t.device)
    if check:
        _raise_if_zero('ddim_hop_edm', 'sigma_t', sigma_t)
    prediction = net(x_t.to(torch.float32), sigma_t, class_labels)
    return ddim_step_edm(x_t, prediction, sigma_t, sigma_s, check=False)


def _per_sample_sum_of_squares(x):
    """Sum of squares of each sample (all dims after the first; x has at least two), shaped [N, 1, ...]."""
    return x.square().sum(dim=tuple(range(1, x.ndim)), keepdim=True)


def addim_step_edm(x_t, x_pred_t, sigma_t, sigma_s, x_var, check=True):
    """Adjusted DDIM step (Heek et al. 2024, §3.2, Eq. 14) from sigma_t to sigma_s in EDM's parameterisation.

    x_var is the posterior variance per dimension, tr(Var[y | x_t]) / d, one value per sample (or a
    scalar). The DDIM step's noise term is lengthened so that the step restores the variance that
    the mean prediction lacks: x_s = x_pred + (sigma_eff / sigma_t) * (x_t - x_pred) with
    sigma_eff = hypot(sigma_s, (sigma_t - sigma_s) * sqrt(d * x_var) / |x_t - x_pred|) (docs/algorithm.md §8.5).
    With x_var = 0 this is exactly ddim_step_edm. Arithmetic is float64; the result takes x_t's dtype.
    """
    sigma_t, sigma_s = _sigma_like(sigma_t, x_t), _sigma_like(sigma_s, x_t)
    x_var = _sigma_like(x_var, x_t)
    if check:
        _raise_if_zero('addim_step_edm', 'sigma_t', sigma_t)
        negative = (x_var.flatten() < 0).nonzero().flatten()
        if len(negative):
            raise ValueError(f'addim_step_edm: x_var must be >= 0, but it is negative for samples {negative.tolist()}')
    x, x_pred = x_t.to(torch.float64), x_pred_t.to(torch.float64)
    noise_norm = _per_sample_sum_of_squares(x - x_pred).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    extra = (sigma_t - sigma_s) * (math.prod(x.shape[1:]) * x_var).sqrt() / noise_norm
    sigma_eff = torch.hypot(sigma_s, extra)
    return (x_pred + (sigma_eff / sigma_t) * (x - x_pred)).to(x_t.dtype)


@torch.no_grad()
def addim_hop_edm(net, x_t, sigma_t, sigma_s, images, eta, class_labels=None, check=True):
    """One adjusted DDIM step of the teacher from sigma_t to sigma_s (one net call), for distillation.

    The posterior variance of each sample is estimated from its clean latent `images` (y), as Heek et
    al. 2024 do (Algorithm 1; eta is their xvar_frac): x_var = eta * |D - y|^2 / d, D = net(x_t; sigma_t).
    eta = 0 gives ddim_hop_edm exactly.
    """
    sigma_t = torch.as_tensor(sigma_t, dtype=torch.float64, device=x_t.device)
    if check:
        _raise_if_zero('addim_hop_edm', 'sigma_t', sigma_t)
        if not 0 <= eta <= 1:
            raise ValueError(f'addim_hop_edm: eta must lie in [0, 1], got {eta}')
    prediction = net(x_t.to(torch.float32), sigma_t, class_labels).to(torch.float64)
    error = prediction - images.to(torch.float64)
    x_var = eta * _per_sample_sum_of_squares(error).flatten() / math.prod(error.shape[1:])
    return addim_step_edm(x_t, prediction, sigma_t, sigma_s, x_var, check=False)

#----------------------------------------------------------------------------
