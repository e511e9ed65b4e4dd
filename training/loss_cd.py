"""Multistep consistency distillation (MSCD) of an EDM2 teacher into an S-step student.

Each sample draws one teacher edge sigma_t -> sigma_s inside a student segment (s[j], s[j+1]]. The
teacher's ODE hop (a Heun step; with teacher_solver, a DDIM or adjusted-DDIM step) and the student's
own no-grad DDIM step carry x_t down to the segment boundary
sigma_bdry = s[j+1]; the target is the prediction at sigma_t whose single DDIM step lands exactly
there. The student's prediction D(x_t; sigma_t) is the only path for gradients. With a guide network
the teacher's ODE is that of the guided denoiser lerp(D_guide, D_teacher, guidance), so the student
learns guided sampling. Section numbers (§n) refer to docs/algorithm.md; the numbers match the parity
fixtures of the EDM reference.
"""

import contextlib
import math

import torch

import dnnlib
from torch_utils import misc
from torch_utils import training_stats
from training import consistency_ops
from training import pretrained
from training.networks_edm2 import suppress_inplace_weight_norm

#----------------------------------------------------------------------------
# Loss weights lambda(sigma) and per-sample distances (docs/algorithm.md §9).

def _inverse_snr(sigma):
    return 1 / (sigma ** 2 + 1e-20)

# Several names are aliases (karras = edm, vlike = snr+1, flat = uniform) but each keeps the
# reference's own float32 expression, so they may differ in the last bit.
LOSS_WEIGHTS = {
    'edm':           lambda sigma, sd: (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2,
    'karras':        lambda sigma, sd: _inverse_snr(sigma) + 1 / sd ** 2,
    'sqrt_karras':   lambda sigma, sd: (sigma ** 2 + sd ** 2).sqrt() / (sigma * sd),
    'snr':           lambda sigma, sd: _inverse_snr(sigma),
    'snr+1':         lambda sigma, sd: _inverse_snr(sigma) + 1,
    'vlike':         lambda sigma, sd: 1 / sigma ** 2 + 1,
    'truncated-snr': lambda sigma, sd: _inverse_snr(sigma).clamp(min=1),
    'flat':          lambda sigma, sd: torch.ones_like(sigma),
    'uniform':       lambda sigma, sd: torch.ones_like(sigma),
}

LOSS_TYPES = ('huber', 'l2', 'l2_root', 'pseudo_huber')
SAMPLING_MODES = ('uniform', 'vp', 'edm')
EDM_SAMPLING_P_MEAN, EDM_SAMPLING_P_STD = -1.2, 1.2  # the log-normal of sampling_mode='edm'
# How the teacher integrates an edge (docs/algorithm.md §8.1, §8.5), and its network evaluations per edge.
TEACHER_SOLVERS = ('heun', 'ddim', 'addim')
TEACHER_EVALUATIONS = dict(heun=2, ddim=1, addim=1)
ADDIM_ETA = 0.75  # Heek et al. 2024's eta (xvar_frac) for the adjusted DDIM teacher
HUBER_DELTA = PSEUDO_HUBER_C = 1e-4  # the reference's fixed constants of the two Huber distances
INIT_HELP = ('Start from this EDM2 network pickle (path or URL): in CD instead of the teacher (e.g. a student with '
    'more steps), in CT and sCT instead of random weights')


def _refuse_unused(sampling_mode, **settings):
    """Settings given explicitly for a sampling mode that does not read them are an error, not ignored."""
    unused = dict(terminal_anchor=sampling_mode == 'uniform', P_mean=sampling_mode != 'edm', P_std=sampling_mode != 'edm')
    for name, value in settings.items():
        if value is not None and unused[name]:
            raise dnnlib.UserError(f'consistency distillation: {name} has no effect with sampling_mode={sampling_mode!r}'
                + (' (the terminal edge is drawn with probability 1/S there)' if name == 'terminal_anchor' else
                '; only sampling_mode=\'edm\' draws log-normal noise levels'), option=name)


def _check_guidance(guidance, guided):
    """Guidance needs a guide network, and a guide needs guidance != 1 to make a difference."""
    if not math.isfinite(guidance):
        raise dnnlib.UserError(f'consistency distillation: guidance must be finite, got {guidance}', option='guidance')
    if guidance != 1 and not guided:
        raise dnnlib.UserError(f'consistency distillation: guidance={guidance:g} needs a guide network for the teacher '
            '(--guide=PKL)', option='guidance')
    if guidance == 1 and guided:
        raise dnnlib.UserError('consistency distillation: a guide has no effect with guidance=1, which is the unguided '
            'teacher; give the guidance weight (--guidance=W, W != 1) or leave out the guide', option='guide_pkl')


def _frozen(net):
    return net.eval().requires_grad_(False)


def loss_weight(sigma, weight_mode, sigma_data=0.5):
    """Float32 weight lambda(sigma) for each sample, shaped [N, 1, 1, 1]."""
    return LOSS_WEIGHTS[weight_mode](sigma.to(torch.float32).reshape(-1, 1, 1, 1), sigma_data)


def consistency_distance(delta, loss_type, huber_delta=1e-4, pseudo_huber_c=1e-4):
    """Unweighted loss of the error delta: per element for huber/l2, per sample ([N,1,1,1]) otherwise."""
    if loss_type == 'huber':
        quadratic = delta.abs().clamp(max=huber_delta)
        return 0.5 * quadratic ** 2 + (delta.abs() - quadratic) * huber_delta
    if loss_type == 'l2':
        return delta ** 2
    squared_norm = (delta ** 2).sum(dim=[1, 2, 3], keepdim=True)
    if loss_type == 'l2_root':
        return squared_norm.clamp(min=1e-12).sqrt()
    return (squared_norm + pseudo_huber_c ** 2).sqrt() - pseudo_huber_c

#----------------------------------------------------------------------------
# Student helpers: dropout detection, replaying the device RNG (docs/algorithm.md §11).

_DROPOUT_LAYERS = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
    torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def _has_active_dropout(net):
    """True if a training-mode submodule drops activations (torch dropout layers or EDM2 blocks' `dropout`)."""
    for module in net.modules():
        if not module.training:
            continue
        rate = module.p if isinstance(module, _DROPOUT_LAYERS) else getattr(module, 'dropout', 0)
        if isinstance(rate, (int, float)) and rate > 0:
            return True
    return False


def _module_device(net, fallback):
    first = next(net.parameters(), None)
    return fallback if first is None else first.device


def device_rng_state(device):
    """State of the default generator that random ops on `device` draw from."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.get_rng_state(device)
    if device.type == 'cpu':
        return torch.get_rng_state()
    raise ValueError(f'Synchronised dropout supports CPU and CUDA students, got device {device}')


def _set_device_rng_state(device, state):
    device = torch.device(device)
    if device.type == 'cuda':
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


@contextlib.contextmanager
def replayed_rng(device, state):
    """Run the body with `device`'s generator rewound to `state`; afterwards it continues from where it was."""
    resume_state = device_rng_state(device)
    _set_device_rng_state(device, state)
    try:
        yield
    finally:
        _set_device_rng_state(device, resume_state)


def synchronised_student_pass(student, x, sigma, labels, rng_device, rng_state):
    """No-grad training-mode D(x; sigma) drawing its dropout masks from `rng_state`, leaving the weights untouched.

    Given the state saved just before the student's own forward and the same batch shape, every
    row gets the mask that row got in that forward.
    """
    with torch.no_grad(), replayed_rng(rng_device, rng_state), suppress_inplace_weight_norm(student):
        return student(x.to(torch.float32), sigma.reshape(-1, 1, 1, 1), labels)

#----------------------------------------------------------------------------
# Per-batch bookkeeping of the three edge classes (docs/algorithm.md §7, §8).

def edge_targets(edges, sigma_s, sigma_bdry):
    """(sigma_s_eff, sigma_ref) per drawn edge: where the teacher hop from sigma_t ends, and where the
    target's DDIM step must land (0 on terminal rows, the segment boundary elsewhere)."""
    terminal, snap = edges['is_terminal'], edges['is_boundary_snap']
    # Snaps stop at the boundary; the max is a no-op on valid grids; terminal rows keep sigma_s = 0.
    sigma_s_eff = torch.where(snap, sigma_bdry, torch.where(terminal, sigma_s, torch.maximum(sigma_s, sigma_bdry)))
    sigma_ref = torch.where(terminal, torch.zeros_like(sigma_bdry), sigma_bdry)
    return sigma_s_eff, sigma_ref


# Hyperparameters that training states of older versions lack, with the values those runs used.
_SETTINGS_ADDED_LATER = dict(teacher_solver='heun', addim_eta=ADDIM_ETA, guidance=1.0)

_INVARIANT_TOL = 1e-8
_EDGE_CLASSES = ('terminal', 'boundary', 'general')


def _describe_row(i, edges, sigma_s_eff, sigma_ref):
    kind = 'terminal' if edges['is_terminal'][i] else 'boundary-snap' if edges['is_boundary_snap'][i] else 'general'
    return (f'sample {i} ({kind} edge, segment j={int(edges["step_j"][i])}, n_rel={int(edges["n_rel"][i])}): '
        f'sigma_t={float(edges["sigma_t"][i])!r}, sigma_s={float(edges["sigma_s"][i])!r}, '
        f'sigma_s_eff={float(sigma_s_eff[i])!r}, sigma_bdry={float(edges["sigma_bdry"][i])!r}, '
        f'sigma_ref={float(sigma_ref[i])!r}')


def _rows_where(flag, count):
    """Indices of the True entries of `flag` in ascending order, as nonzero() gives them, but computed on
    flag's device from a count the host already knows: a stable sort puts the True rows first."""
    return torch.argsort((~flag).to(torch.uint8), stable=True)[:count]


def _classify_rows(edges, student_sigmas, sigma_s_eff, sigma_ref):
    """Check the ordering invariants with one device-to-host transfer; return row indices and counts per class.

    Raises ValueError naming the sigmas of the first offending sample: a broken ordering, or a
    degenerate pair (sigma_t = 0 or sigma_t ~ sigma_ref) for which the inverse DDIM step is undefined,
    or a teacher hop to sigma = 0 on a non-terminal row. The ODE steps can then skip their own checks.
    The row indices stay on the device, so no host-to-device copy waits for the GPU either.
    """
    sigma_t, sigma_s, sigma_bdry = edges['sigma_t'], edges['sigma_s'], edges['sigma_bdry']
    terminal, snap = edges['is_terminal'], edges['is_boundary_snap']
    step_j = edges['step_j']
    below_upper_node = (step_j == 0) | terminal | (sigma_t < student_sigmas[step_j] + _INVARIANT_TOL)
    ordered = (below_upper_node & (sigma_t > sigma_s - _INVARIANT_TOL)
        & (terminal | (sigma_t > sigma_s_eff - _INVARIANT_TOL)) & (sigma_s_eff >= sigma_bdry - _INVARIANT_TOL))
    degenerate = (sigma_t == 0) | ((sigma_t - sigma_ref).abs() < 1e-12) | (~terminal & (sigma_s_eff == 0))
    names = (*_EDGE_CLASSES, 'non_terminal')
    flags = torch.stack([terminal, snap, ~(terminal | snap), ~terminal, ~ordered, degenerate])
    num_terminal, num_boundary, num_general, num_non_terminal, num_unordered, num_degenerate = flags.sum(dim=1).tolist()

    for problem, bad, count in (('breaks the sigma ordering of its edge class', ~ordered, num_unordered),
            ('has a degenerate sigma pair (sigma_t = 0, sigma_t ~ sigma_ref, or a hop to sigma = 0)', degenerate, num_degenerate)):
        if count:
            first = int(_rows_where(bad, 1))
            raise ValueError(f'Consistency-distillation edge {problem}: '
                f'{_describe_row(first, edges, sigma_s_eff, sigma_ref)} ({count} such samples)')
    counts = dict(zip(names, (num_terminal, num_boundary, num_general, num_non_terminal)))
    rows = {name: _rows_where(flags[i], counts[name]) for i, name in enumerate(names)}
    return rows, {name: counts[name] for name in _EDGE_CLASSES}

#----------------------------------------------------------------------------
# The loss.

class EDMConsistencyDistillLoss:
    """MSCD loss with the EDM2 loss interface: loss_fn(net, images, labels) -> per-sample loss.

    teacher_net:        frozen EDM2 denoiser D_T (kept in eval mode, requires_grad off, moved to the data's
                        device on first use); None to load it from teacher_pkl in prepare(), or to attach it later.
    teacher_pkl:        network pickle (path or URL) of the teacher; teacher_sha256, if given, pins its content.
    S:                  student steps, i.e. segments of the sigma axis.
    T_start, T_end:     target number of teacher edges (one teacher_solver step each) at the start and end of
                        the log-linear anneal over T_anneal_kimg thousand images (<= 0: T_end throughout).
                        The grid actually used can hold one edge more (T_eff, docs/algorithm.md §4).
    rho, sigma_min, sigma_max: Karras discretisation shared by the student and teacher grids.
    student_sigma_min:  the student's last node, where its last step starts (None: sigma_min, as the reference).
                        The teacher grid still ends at sigma_min; at small S a higher last node avoids spending
                        a step on the nearly clean range below (docs/algorithm.md §3).
    loss_type:          'huber' (per element, threshold huber_delta), 'l2' (per element), 'l2_root' or
                        'pseudo_huber' (per sample; sqrt(|delta|^2 + c^2) - c with c = pseudo_huber_c).
    weight_mode:        lambda(sigma_t), one of LOSS_WEIGHTS; sqrt_karras is 1/c_out(sigma_t).
    sampling_mode:      'uniform' (a uniform segment, then a uniform edge in it: the terminal edge gets 1/S),
                        'vp' (half-Cauchy density in sigma) or 'edm' (log-normal with P_mean, P_std).
    terminal_anchor:    in vp/edm, give the terminal edge sigma_min -> 0 probability exactly 1/T_eff (None: on).
    terminal_teacher_hop: terminal target D_T(x_t; sigma_min) instead of the clean latent.
                        terminal_anchor, P_mean and P_std may be given only with the sampling modes that use them.
    teacher_solver:     the teacher's step along an edge: 'heun' (2 evaluations), 'ddim' (Euler, 1 evaluation)
                        or 'addim' (Heek et al.'s adjusted DDIM, 1 evaluation).
    addim_eta:          aDDIM's eta in [0, 1], the fraction of the teacher's squared error |D_T - y|^2 that
                        counts as posterior variance (None: ADDIM_ETA = 0.75; only with teacher_solver='addim').
    init_pkl, init_sha256: start the student from this network pickle (path or URL; init_sha256 pins its
                        content) instead of the teacher, e.g. from a student of the same teacher with more
                        steps; it must have the teacher's architecture.
    guide_net, guide_pkl, guide_sha256: the frozen guide network D_g of the teacher (e.g. its unconditional
                        or a smaller, less trained version), like teacher_net, teacher_pkl and teacher_sha256.
    guidance:           the guidance weight w: every teacher evaluation is lerp(D_g, D_T, w) (pretrained.
                        GuidedDenoiser, docs/algorithm.md §8.6); 1 is the unguided teacher and takes no guide.
    sync_dropout:       give the no-grad target pass the same dropout masks as the student's pass.
    report_stats:       report CD/... diagnostics through torch_utils.training_stats.

    As a training method (training/training_loop.py): prepare() loads and checks the teacher (and the
    guide, and init_pkl's network), init_network() copies the teacher (or init_pkl's network) into the
    student and freezes the uncertainty head,
    set_progress() drives the anneal, snapshot_entries() gives student snapshots their 'cd' entry (and
    no loss object). Pickling drops the teacher, the guide and the grid caches; call attach_teacher()
    afterwards. For resuming, state_dict()/load_state_dict() carry only runtime state and refuse
    different hyperparameters.
    """

    # Command-line options of --method=cd: option -> (constructor argument, type or choices, help).
    OPTIONS = {
        'teacher':              ('teacher_pkl', 'PKL', 'Distil this EDM2 network pickle (path or URL)'),
        'S':                    ('S', int, 'Student sampling steps'),
        'T_start':              ('T_start', int, 'ODE edges (in CD, teacher solver steps) of the fine grid at the start'),
        'T_end':                ('T_end', int, 'ODE edges of the fine grid at the end of the anneal'),
        'T_anneal_kimg':        ('T_anneal_kimg', float, 'Thousands of images over which T grows log-linearly'),
        'rho':                  ('rho', float, 'Karras grid exponent'),
        'sigma_min':            ('sigma_min', float, 'Lowest noise level of the grids'),
        'sigma_max':            ('sigma_max', float, 'Highest noise level of the grids'),
        'student_sigma_min':    ('student_sigma_min', float, 'Noise level of the student\'s last step, in [sigma_min, '
                                 'sigma_max) [default: sigma_min]'),
        'cd_loss':              ('loss_type', LOSS_TYPES, 'Distance between prediction and target'),
        'cd_weight_mode':       ('weight_mode', tuple(LOSS_WEIGHTS), 'Per-sample weight of sigma_t'),
        'cd_huber_c':           ('pseudo_huber_c', float, 'c of --cd_loss=pseudo_huber, sqrt(|delta|^2 + c^2) - c per sample '
                                 f'[default: {PSEUDO_HUBER_C}]'),
        'cd_huber_delta':       ('huber_delta', float, 'h of --cd_loss=huber, quadratic below h and linear above, per element '
                                 f'[default: {HUBER_DELTA}]'),
        'sampling_mode':        ('sampling_mode', SAMPLING_MODES, 'How edges are drawn (vp, edm: importance weights; uniform: per segment)'),
        'cd_P_mean':            ('P_mean', float, f'Log-normal mean for --sampling_mode=edm [default: {EDM_SAMPLING_P_MEAN}]'),
        'cd_P_std':             ('P_std', float, f'Log-normal std for --sampling_mode=edm [default: {EDM_SAMPLING_P_STD}]'),
        'sync_dropout':         ('sync_dropout', bool, 'Same dropout masks for prediction and target'),
        'terminal_anchor':      ('terminal_anchor', bool, 'Draw the sigma_min->0 edge with probability 1/T_eff (vp, edm) [default: on]'),
        'terminal_teacher_hop': ('terminal_teacher_hop', bool, 'Terminal target is the teacher denoising at sigma_min instead of the data'),
        'teacher_solver':       ('teacher_solver', TEACHER_SOLVERS, 'Teacher step along an edge: heun (2 evaluations), '
                                 'ddim (1) or addim (adjusted DDIM, 1)'),
        'addim_eta':            ('addim_eta', float, 'Share of the teacher\'s squared error that --teacher_solver=addim '
                                 f'adds back as variance, in [0, 1] [default: {ADDIM_ETA}]'),
        'init':                 ('init_pkl', 'PKL', INIT_HELP),
        'guide':                ('guide_pkl', 'PKL', 'Guide the teacher with this EDM2 network pickle (path or URL), e.g. '
                                 'its unconditional or a smaller, less trained version'),
        'guidance':             ('guidance', float, 'Guidance weight W of the teacher, D = guide + W (teacher - guide); '
                                 '1 = unguided'),
    }

    def __init__(self, teacher_net=None, teacher_pkl=None, teacher_sha256=None, S=8, T_start=256, T_end=1024,
            T_anneal_kimg=750, rho=7.0, sigma_min=0.002, sigma_max=80.0, student_sigma_min=None, loss_type='pseudo_huber',
            weight_mode='sqrt_karras', sigma_data=0.5, sampling_mode='vp', sync_dropout=True, terminal_anchor=None,
            terminal_teacher_hop=False, P_mean=None, P_std=None, huber_delta=None, pseudo_huber_c=None,
            report_stats=True, teacher_solver='heun', addim_eta=None, guide_net=None, guide_pkl=None, guide_sha256=None,
            guidance=1.0, init_pkl=None, init_sha256=None):
        _refuse_unused(sampling_mode, terminal_anchor=terminal_anchor, P_mean=P_mean, P_std=P_std)
        _check_guidance(float(guidance), guided=guide_net is not None or guide_pkl is not None)
        if addim_eta is not None and teacher_solver in TEACHER_SOLVERS and teacher_solver != 'addim':
            raise dnnlib.UserError(f'consistency distillation: addim_eta has no effect with teacher_solver={teacher_solver!r}; '
                'only teacher_solver=\'addim\' reads it', option='addim_eta')
        for name, value, reader in [('huber_delta', huber_delta, 'huber'), ('pseudo_huber_c', pseudo_huber_c, 'pseudo_huber')]:
            if value is not None and loss_type in LOSS_TYPES and loss_type != reader:
                raise dnnlib.UserError(f'consistency distillation: {name} has no effect with loss_type={loss_type!r}; '
                    f'only loss_type={reader!r} reads it', option=name)
        self.teacher_pkl, self.teacher_sha256 = teacher_pkl, teacher_sha256
        self.guide_pkl, self.guide_sha256, self.guidance = guide_pkl, guide_sha256, float(guidance)
        self.init_pkl, self.init_sha256 = init_pkl, init_sha256
        self.S, self.T_start, self.T_end, self.T_anneal_kimg = int(S), int(T_start), int(T_end), float(T_anneal_kimg)
        self.rho, self.sigma_min, self.sigma_max = float(rho), float(sigma_min), float(sigma_max)
        self.student_sigma_min = float(sigma_min if student_sigma_min is None else student_sigma_min)
        self.loss_type, self.weight_mode, self.sigma_data = loss_type, weight_mode, float(sigma_data)
        self.sampling_mode = sampling_mode
        self.P_mean = float(EDM_SAMPLING_P_MEAN if P_mean is None else P_mean)
        self.P_std = float(EDM_SAMPLING_P_STD if P_std is None else P_std)
        self.sync_dropout = bool(sync_dropout)
        self.terminal_anchor = bool(sampling_mode != 'uniform' if terminal_anchor is None else terminal_anchor)
        self.terminal_teacher_hop = bool(terminal_teacher_hop)
        self.teacher_solver = teacher_solver
        self.addim_eta = float(ADDIM_ETA if addim_eta is None else addim_eta)
        self.huber_delta = HUBER_DELTA if huber_delta is None else float(huber_delta)
        self.pseudo_huber_c = PSEUDO_HUBER_C if pseudo_huber_c is None else float(pseudo_huber_c)
        self.report_stats = bool(report_stats)
        self._validate()

        self.progress_kimg = 0.0
        self.edge_counts = dnnlib.EasyDict({name: 0 for name in (*_EDGE_CLASSES, 'total')})
        self.teacher_net = None
        self.guide_net = None if guide_net is None else _frozen(guide_net)
        self.init_net = None
        self._encoder = None        # the run's, for sampling the teacher as a validation baseline
        self._grid_cache = dict()   # (T, S, sigma_min, sigma_max, rho, student_sigma_min) -> float64 CPU grids
        self._device_grids = None   # (key, device, grids) of the last call
        self._guided = None         # the guided teacher, built once per pair of networks (_denoiser)
        self._student_grid = None
        if teacher_net is not None:
            self.attach_teacher(teacher_net)

    def _validate(self):
        def require(ok, option, what):
            if not ok:
                raise dnnlib.UserError(f'consistency distillation: {what}', option=option)
        require(self.S >= 1, 'S', f'S must be >= 1, got {self.S}')
        require(self.T_start >= self.S, 'T_start', f'{self.T_start} teacher edges cannot cover {self.S} student steps; '
            f'T_start must be >= S (2x recommended)')
        require(self.T_end >= self.T_start, 'T_end', f'T_end must be >= T_start = {self.T_start}, got {self.T_end}')
        require(self.rho > 0, 'rho', f'rho must be positive, got {self.rho}')
        require(0 < self.sigma_min < self.sigma_max, 'sigma_min', f'expected 0 < sigma_min < sigma_max, '
            f'got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}')
        require(self.sigma_min <= self.student_sigma_min < self.sigma_max, 'student_sigma_min', f'expected sigma_min = '
            f'{self.sigma_min} <= student_sigma_min < sigma_max = {self.sigma_max}, got {self.student_sigma_min}')
        require(self.sigma_data > 0, 'sigma_data', f'sigma_data must be positive, got {self.sigma_data}')
        require(self.loss_type in LOSS_TYPES, 'loss_type', f'loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}')
        require(self.weight_mode in LOSS_WEIGHTS, 'weight_mode',
            f'weight_mode must be one of {tuple(LOSS_WEIGHTS)}, got {self.weight_mode!r}')
        require(self.sampling_mode in SAMPLING_MODES, 'sampling_mode',
            f'sampling_mode must be one of {SAMPLING_MODES}, got {self.sampling_mode!r}')
        require(self.P_std > 0, 'P_std', f'P_std must be positive, got {self.P_std}')
        require(self.teacher_solver in TEACHER_SOLVERS, 'teacher_solver',
            f'teacher_solver must be one of {TEACHER_SOLVERS}, got {self.teacher_solver!r}')
        require(0 <= self.addim_eta <= 1, 'addim_eta', f'addim_eta must lie in [0, 1], got {self.addim_eta}')
        require(self.huber_delta > 0, 'huber_delta', f'huber_delta must be positive, got {self.huber_delta}')
        require(self.pseudo_huber_c >= 0, 'pseudo_huber_c', f'pseudo_huber_c must be >= 0, got {self.pseudo_huber_c}')

    def hyperparameters(self):
        """The settings that define the objective; a resumed run must use the same ones."""
        names = ('S', 'T_start', 'T_end', 'T_anneal_kimg', 'rho', 'sigma_min', 'sigma_max', 'student_sigma_min', 'loss_type',
            'weight_mode', 'sigma_data', 'sampling_mode', 'P_mean', 'P_std', 'sync_dropout', 'terminal_anchor',
            'terminal_teacher_hop', 'huber_delta', 'pseudo_huber_c', 'teacher_solver', 'addim_eta', 'guidance')
        return {name: getattr(self, name) for name in names}

    #------------------------------------------------------------------------
    # Teacher, pickling and checkpoints.

    def attach_teacher(self, teacher_net, guide_net=None):
        """Use `teacher_net` as the frozen teacher and, if given, `guide_net` as its frozen guide (e.g. after
        unpickling the loss, which drops both)."""
        self.teacher_net = _frozen(teacher_net)
        if guide_net is not None:
            self.guide_net = _frozen(guide_net)
        return self

    #------------------------------------------------------------------------
    # The training-method hooks (training/training_loop.py).

    def prepare(self, encoder, latent_shape, label_dim, device):
        """Load the teacher from teacher_pkl and the guide from guide_pkl (unless attached), check their
        content and their fit to the data."""
        self._encoder = encoder
        if self.teacher_pkl is not None:
            teacher = pretrained.load_pinned(self.teacher_pkl, self.teacher_sha256, '--teacher', 'teacher_pkl',
                'teacher_sha256', 'distils')
            self.teacher_sha256 = teacher.sha256
            pretrained.check_against_data(teacher.net, teacher.encoder, encoder, latent_shape, label_dim,
                argument='teacher_pkl')
            self.attach_teacher(teacher.net)
        elif self.teacher_net is None:
            raise dnnlib.UserError('consistency distillation needs a teacher network pickle (--teacher=PKL)',
                option='teacher_pkl')
        else:
            pretrained.check_against_data(self.teacher_net, None, encoder, latent_shape, label_dim)
        if self.guide_pkl is not None:
            guide = pretrained.load_pinned(self.guide_pkl, self.guide_sha256, '--guide', 'guide_pkl', 'guide_sha256',
                'guides its teacher with')
            self.guide_sha256 = guide.sha256
            self._check_guide(guide.net, guide.encoder, encoder, latent_shape, label_dim)
            self.guide_net = _frozen(guide.net)
        elif self.guide_net is not None:
            self._check_guide(self.guide_net, None, encoder, latent_shape, label_dim)
        for net in (self.teacher_net, self.guide_net):
            if net is not None:
                net.to(device)
        if self.init_pkl is not None:
            init = pretrained.load_starting_network(self.init_pkl, self.init_sha256, encoder, latent_shape, label_dim)
            self.init_net, self.init_sha256 = init.net, init.sha256

    @staticmethod
    def _check_guide(guide, guide_encoder, encoder, latent_shape, label_dim):
        """The guide must fit the data as the teacher does, but may be unconditional (label_dim 0, as for CFG)."""
        pretrained.check_against_data(guide, guide_encoder, encoder, latent_shape, label_dim if guide.label_dim else None,
            role='guide', option='--guide', argument='guide_pkl')

    def pinned_kwargs(self):
        """Constructor arguments that make a later run use exactly this teacher file (and guide file)."""
        pins = {}
        if self.teacher_pkl is not None:
            pins.update(teacher_sha256=self.teacher_sha256)
        if self.guide_pkl is not None:
            pins.update(guide_sha256=self.guide_sha256)
        if self.init_pkl is not None:
            pins.update(init_sha256=self.init_sha256)
        return pins

    def architecture(self):
        """The student's architecture: the teacher's."""
        return pretrained.network_kwargs(self._teacher())

    def init_network(self, net):
        """Start the student from the teacher's weights (or init_pkl's); the uncertainty head gets no gradient in CD."""
        if self.init_pkl is None:
            pretrained.copy_weights(net, self._teacher())
        else:
            if self.init_net is None:
                raise RuntimeError('EDMConsistencyDistillLoss has not loaded init_pkl (pickling drops it); call prepare() first')
            pretrained.copy_weights(net, self.init_net, role='starting network')
            self.init_net = None  # needed once; a resumed run loads its training state instead
        pretrained.freeze_parameters(net, ['logvar_linear'])

    def set_progress(self, cur_nimg):
        """Set the training progress (images seen so far), which drives the T anneal."""
        self.progress_kimg = cur_nimg / 1e3

    def validation_baselines(self, heun=True):
        """What validation compares the student with, once per run: the teacher (guided, with a guide)
        sampled with Euler on the student's S-step grid and, with `heun`, with EDM2's Heun sampler (its
        default 32 steps)."""
        return self._baselines('teacher', self._denoiser(), heun)

    def _baselines(self, network, net, heun):
        data = dict(ema=net, encoder=self._encoder)
        grid = dict(num_steps=self.S, sigma_min=self.student_sigma_min, sigma_max=self.sigma_max, rho=self.rho)
        baselines = [dnnlib.EasyDict(network=network, data=data, sampler='euler', sampler_kwargs=grid)]
        if heun:
            baselines.append(dnnlib.EasyDict(network=network, data=data, sampler='heun', sampler_kwargs={}))
        return baselines

    def snapshot_entries(self):
        """The 'cd' entry of student snapshots: what generate_images.py needs to sample in S steps."""
        return dict(cd=dnnlib.EasyDict(S=self.S, sigma_min=self.student_sigma_min, sigma_max=self.sigma_max, rho=self.rho,
            student_sigmas=self.student_sigmas().tolist(), teacher=str(self.teacher_pkl),
            guide=None if self.guide_pkl is None else str(self.guide_pkl), guidance=self.guidance,
            init=None if self.init_pkl is None else str(self.init_pkl), loss_kwargs=self.hyperparameters()))

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(teacher_net=None, guide_net=None, init_net=None, _guided=None, _encoder=None, _grid_cache=dict(), _device_grids=None,
            _student_grid=None)
        return state

    def __setstate__(self, state):
        # Losses pickled before the guided cache and the student's own last node existed.
        self.__dict__.update(dict(_guided=None, student_sigma_min=state.get('sigma_min'), init_pkl=None, init_sha256=None,
            init_net=None) | state)

    def state_dict(self):
        return dict(hyperparameters=self.hyperparameters(), progress_kimg=self.progress_kimg,
            edge_counts=dict(self.edge_counts))

    def load_state_dict(self, state):
        """Restore progress and edge counters; the teacher and hyperparameters stay as constructed."""
        # States written before a setting existed were made with the behaviour its default keeps.
        saved = {**_SETTINGS_ADDED_LATER, 'student_sigma_min': state['hyperparameters'].get('sigma_min'), **state['hyperparameters']}
        current = self.hyperparameters()
        differing = [f'{name}: checkpoint {saved.get(name, "<missing>")!r}, now {current.get(name, "<missing>")!r}'
            for name in sorted(set(saved) | set(current)) if saved.get(name) != current.get(name)]
        if differing:
            raise dnnlib.UserError('The training state was made with other consistency-distillation settings; '
                'resume with the same ones or start a new run. Differences: ' + '; '.join(differing))
        self.progress_kimg = float(state['progress_kimg'])
        self.edge_counts = dnnlib.EasyDict(state['edge_counts'])

    def _teacher(self):
        return self._check_frozen(self.teacher_net, 'teacher', 'attach_teacher(teacher_net)')

    @staticmethod
    def _check_frozen(net, role, attach):
        if net is None:
            raise RuntimeError(f'EDMConsistencyDistillLoss has no {role} (pickling drops it); '
                f'call prepare() or {attach} first')
        if net.training:
            raise RuntimeError(f'The consistency-distillation {role} must stay in eval mode: a training-mode '
                'forward of an EDM2 network rewrites its weights')
        return net

    def _denoiser(self):
        """The denoiser whose ODE the teacher solves: the teacher, or with guidance the guided teacher (§8.6)."""
        if self.guidance == 1:
            return self._teacher()
        teacher, guide = self._teacher(), self._check_frozen(self.guide_net, 'guide', 'attach_teacher(teacher_net, guide_net)')
        guided = self._guided  # built once per pair of networks: this is the hot path
        if guided is None or guided.net is not teacher or guided.gnet is not guide:
            self._guided = guided = pretrained.GuidedDenoiser(teacher, guide, self.guidance)
        return guided

    def _teacher_on(self, device):
        """_denoiser() with its networks on `device`."""
        for net in (self._teacher(), self.guide_net):
            if net is not None and _module_device(net, device) != device:
                net.to(device)
        return self._denoiser()

    #------------------------------------------------------------------------
    # Annealing and grids (docs/algorithm.md §4, §10).

    def current_teacher_edges(self):
        """Annealed target T for the current progress (the grid may hold T_eff = T + 1 edges)."""
        return consistency_ops.annealed_teacher_edges(self.progress_kimg, self.T_start, self.T_end, self.T_anneal_kimg)

    def student_sigmas(self, device=torch.device('cpu')):
        """Student grid (S Karras nodes from sigma_max to student_sigma_min, then 0), float64 on `device`."""
        device = torch.device(device)
        if self._student_grid is None or self._student_grid.device != device:
            self._student_grid = consistency_ops.make_edge_grid(self.S, self.student_sigma_min, self.sigma_max, self.rho).to(device)
        return self._student_grid

    def grids(self, T, device=torch.device('cpu')):
        """Student grid, teacher grid for target T, terminal edge index, segment bounds and T_eff on `device`."""
        key = (int(T), self.S, self.sigma_min, self.sigma_max, self.rho, self.student_sigma_min)
        device = torch.device(device)
        if self._device_grids is not None and self._device_grids[:2] == (key, device):
            return self._device_grids[2]
        cpu = self._grid_cache.get(key)
        if cpu is None:
            student, teacher, terminal_k = consistency_ops.build_student_teacher_grids(
                self.S, int(T), self.sigma_min, self.sigma_max, self.rho, self.student_sigma_min)
            bounds = consistency_ops.partition_edges_by_sigma(student, teacher)
            cpu = dnnlib.EasyDict(student=student, teacher=teacher, terminal_k=terminal_k, bounds=bounds,
                T_eff=len(teacher) - 1)
            self._grid_cache[key] = cpu
        on_device = dnnlib.EasyDict(cpu, student=cpu.student.to(device), teacher=cpu.teacher.to(device),
            bounds=cpu.bounds.to(device))
        # Computed from the grid on the device, as the sampler would compute it every step.
        on_device.edge_probs = None if self.sampling_mode == 'uniform' else consistency_ops.compute_importance_weights(
            on_device.teacher, self.rho, self.sampling_mode, self.P_mean, self.P_std, self.terminal_anchor)
        self._device_grids = (key, device, on_device)
        return on_device

    #------------------------------------------------------------------------
    # Loss evaluation.

    def __call__(self, net, images, labels=None):
        """Per-sample loss ([N,1,1,1]) or per-element loss ([N,C,H,W]) for huber/l2, as the training loop sums it."""
        with torch.profiler.record_function('cd/draw_edges'):
            T = self.current_teacher_edges()
            grids = self.grids(T, images.device)
            edges, noise = self.draw_edges(images, grids)
        with torch.profiler.record_function('cd/diagnostics'):
            if self.report_stats:
                training_stats.report('CD/T_target', T)
                training_stats.report('CD/T_edges', grids.T_eff)
        return self.loss_from_edges(net, images, labels, edges, noise)

    def draw_edges(self, images, grids):
        """One teacher edge per image from `grids` (see grids()) and the noise of x_t, from the global RNG."""
        edges = consistency_ops.sample_segment_and_teacher_pair(grids.bounds, grids.teacher, grids.student,
            images.shape[0], images.device, terminal_k=grids.terminal_k, sampling_mode=self.sampling_mode,
            rho=self.rho, P_mean=self.P_mean, P_std=self.P_std, terminal_anchor=self.terminal_anchor,
            edge_probs=grids.edge_probs)
        return edges, torch.randn_like(images)

    def loss_from_edges(self, net, images, labels, edges, noise):
        """Deterministic core of __call__ for given edges (sampler dict) and noise eps of x_t = images + sigma_t*eps."""
        # The named ranges label the parts of the loss in torch.profiler traces (bench/bench_cd.py sums
        # them). They change no value or random draw; with no profiler active each costs a few
        # microseconds of host time.
        device = images.device
        student = misc.unwrap_ddp(net)
        with torch.profiler.record_function('cd/classify_edges'):
            sigma_t, sigma_s, sigma_bdry = (edges[name].to(torch.float64) for name in ('sigma_t', 'sigma_s', 'sigma_bdry'))
            sigma_s_eff, sigma_ref = edge_targets(edges, sigma_s, sigma_bdry)
            rows, counts = _classify_rows(dict(edges, sigma_t=sigma_t, sigma_s=sigma_s, sigma_bdry=sigma_bdry),
                self.student_sigmas(device), sigma_s_eff, sigma_ref)
            pick = lambda tensor, name: None if tensor is None else tensor[rows[name]]

            # x_ref becomes the point at sigma_ref that the target's DDIM step must reach: the clean latent
            # on terminal rows, and on the others the ODE hop's x_s (general rows: until the student's push).
            x_ref = images.to(torch.float64, copy=True)
            x_t = x_ref + sigma_t.reshape(-1, 1, 1, 1) * noise.to(torch.float64)
        if len(rows['non_terminal']):
            with torch.profiler.record_function('cd/teacher_hop'):
                x_ref[rows['non_terminal']] = self.ode_hop(pick(x_t, 'non_terminal'), pick(sigma_t, 'non_terminal'),
                    pick(sigma_s_eff, 'non_terminal'), pick(labels, 'non_terminal'), pick(x_ref, 'non_terminal'),
                    pick(noise, 'non_terminal'))
        if self.terminal_teacher_hop and counts['terminal']:
            with torch.no_grad(), torch.profiler.record_function('cd/terminal_teacher'):
                x_ref[rows['terminal']] = self._teacher_on(device)(pick(x_t, 'terminal').to(torch.float32),
                    pick(sigma_t, 'terminal'), pick(labels, 'terminal')).to(torch.float64)

        with torch.profiler.record_function('cd/student_forward'):
            dropout = _has_active_dropout(student)
            rng_device = _module_device(student, device)
            rng_state = device_rng_state(rng_device) if dropout and self.sync_dropout else None
            x_hat_t = net(x_t.to(torch.float32), sigma_t.reshape(-1, 1, 1, 1), labels).to(torch.float32)

        with torch.no_grad(), torch.profiler.record_function('cd/target_pass'):
            if counts['general']:
                if rng_state is not None:
                    # A dropout mask spans the whole batch tensor, so rows line up only in a same-shaped
                    # pass: the other rows are re-run at (x_t, sigma_t) and discarded.
                    is_general = ~edges['is_terminal'] & ~edges['is_boundary_snap']
                    x_in = torch.where(is_general.reshape(-1, 1, 1, 1), x_ref, x_t)
                    sigma_in = torch.where(is_general, sigma_s_eff, sigma_t)
                    h = synchronised_student_pass(student, x_in, sigma_in, labels, rng_device, rng_state)
                    h = h[rows['general']]
                else:
                    h = self._general_student_pass(student, pick(x_ref, 'general'), pick(sigma_s_eff, 'general'),
                        pick(labels, 'general'), eval_mode=dropout)
                x_ref[rows['general']] = consistency_ops.ddim_step_edm(pick(x_ref, 'general'), h.to(torch.float64),
                    pick(sigma_s_eff, 'general'), pick(sigma_bdry, 'general'), check=False)
            target = consistency_ops.inv_ddim_edm(x_ref, x_t, sigma_t, sigma_ref, check=False).to(torch.float32)

        with torch.profiler.record_function('cd/distance'):
            delta = x_hat_t - target
            loss = loss_weight(sigma_t, self.weight_mode, self.sigma_data) * consistency_distance(
                delta, self.loss_type, self.huber_delta, self.pseudo_huber_c)
        with torch.profiler.record_function('cd/diagnostics'):
            self._record(edges, sigma_t, sigma_s_eff, sigma_bdry, sigma_ref, delta, rows, counts)
        return loss

    def ode_hop(self, x_t, sigma_t, sigma_s, labels, images, noise):
        """x at sigma_s on the probability-flow ODE through x_t = images + sigma_t * noise (float64 rows):
        here one step of the teacher (guided, with a guide) with teacher_solver (docs/algorithm.md §8.1, §8.5, §8.6)."""
        teacher = self._teacher_on(x_t.device)
        if self.teacher_solver == 'ddim':
            return consistency_ops.ddim_hop_edm(teacher, x_t, sigma_t, sigma_s, labels, check=False)
        if self.teacher_solver == 'addim':
            return consistency_ops.addim_hop_edm(teacher, x_t, sigma_t, sigma_s, images, self.addim_eta, labels,
                check=False)
        return consistency_ops.heun_hop_edm(teacher, x_t, sigma_t, sigma_s, labels, check=False)

    @staticmethod
    def _general_student_pass(student, x_s, sigma_s, labels, eval_mode):
        """D(x_s; sigma_s) on the general rows only: dropout is off, or deliberately not synchronised."""
        x_in, sigma_in = x_s.to(torch.float32), sigma_s.reshape(-1, 1, 1, 1)
        if not eval_mode:
            with suppress_inplace_weight_norm(student):  # no dropout: same values as an eval-mode pass
                return student(x_in, sigma_in, labels)
        student.eval()
        prediction = student(x_in, sigma_in, labels)
        student.train()  # Deliberate, as in the reference: the student ends in train mode.
        return prediction

    #------------------------------------------------------------------------
    # Diagnostics (docs/algorithm.md §13).

    def _record(self, edges, sigma_t, sigma_s_eff, sigma_bdry, sigma_ref, delta, rows, counts):
        for name, count in counts.items():
            self.edge_counts[name] += count
        self.edge_counts.total += sum(counts.values())
        if not self.report_stats:
            return
        batch_size = sum(counts.values())
        training_stats.report('CD/sigma_t', sigma_t)
        training_stats.report('CD/sigma_s', sigma_s_eff)
        training_stats.report('CD/sigma_bdry', sigma_bdry)
        training_stats.report('CD/seg_id', edges['step_j'])
        gain = 1 / (1 - sigma_ref / sigma_t.clamp(min=1e-12)).clamp(min=1e-6)
        l2_error = delta.detach().flatten(1).norm(dim=1)
        training_stats.report('CD/gain_mean', gain)
        training_stats.report('CD/gain_max', gain.max())
        training_stats.report('CD/l2_error_all', l2_error)
        for name in _EDGE_CLASSES:  # an empty class reports no values, but every rank must register the same names
            training_stats.report(f'CD/frac_{name}', counts[name] / batch_size)
            training_stats.report(f'CD/gain_{name}_mean', gain[rows[name]])
            training_stats.report(f'CD/l2_error_{name}', l2_error[rows[name]])

#----------------------------------------------------------------------------
