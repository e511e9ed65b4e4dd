"""Continuous-time consistency models (sCM; Lu & Song 2024, "Simplifying, Stabilizing & Scaling
Continuous-Time Consistency Models") for EDM2 networks: distillation from a teacher (sCD) and
training from data alone (sCT).

TrigFlow writes a noisy sample as x_t = cos(t) x_0 + sin(t) z with z ~ N(0, sigma_data^2 I) and
t in [0, pi/2]. It is EDM's x = x_0 + sigma n seen through x = x_t / cos t, sigma = sigma_data tan t,
so an EDM denoiser D(x; sigma) is a TrigFlow consistency function f(x_t, t) = D(x_t / cos t;
sigma_data tan t) = cos(t) x_t - sigma_data sin(t) F(x_t / sigma_data, t) without any retraining
(TrigFlowView). The student is an ordinary EDM2 Precond; the loss asks that f stays constant along
the probability-flow ODE, with the time derivative df/dt taken exactly, by a Jacobian-vector product
through the student. docs/scm.md explains the method and its options; "§n" refers to its sections.
"""

import math

import torch

import dnnlib
from torch_utils import misc
from torch_utils import training_stats
from training import pretrained
from training.loss_cd import INIT_HELP, device_rng_state, replayed_rng
from training.networks_edm2 import suppress_inplace_weight_norm

#----------------------------------------------------------------------------
# TrigFlow coordinates of an EDM denoiser (docs/scm.md §1).

def edm_coordinates(x_t, t, sigma_data):
    """EDM's (x, sigma) of TrigFlow's (x_t, t): x = x_t / cos t, sigma = sigma_data tan t."""
    return x_t / t.cos(), sigma_data * t.tan()


def velocity_from_denoised(x_t, t, denoised):
    """The PF-ODE velocity dx_t/dt = (cos t x_t - f) / sin t = sigma_data F that a prediction f of x_0 implies."""
    return (t.cos() * x_t - denoised) / t.sin()


class TrigFlowView:
    """An EDM denoiser D(x; sigma) (an EDM2 Precond, a guided pair, any D) in TrigFlow's coordinates.

    t is a tensor broadcastable to x_t ([N, 1, 1, 1]); labels go to the denoiser unchanged.
    """

    def __init__(self, net, sigma_data=0.5):
        self.net, self.sigma_data = net, sigma_data

    def denoise(self, x_t, t, labels=None):
        """The consistency function f(x_t, t) = D(x_t / cos t; sigma_data tan t)."""
        x, sigma = edm_coordinates(x_t, t, self.sigma_data)
        return self.net(x, sigma, labels)

    def velocity(self, x_t, t, labels=None):
        """dx_t/dt of the PF-ODE (the paper's sigma_data F(x_t / sigma_data, t))."""
        return velocity_from_denoised(x_t, t, self.denoise(x_t, t, labels))

    def F(self, x_scaled, t, labels=None):
        """The network output F(x_t / sigma_data, t) of the parameterisation f = cos t x_t - sigma_data sin t F."""
        return self.velocity(x_scaled * self.sigma_data, t, labels) / self.sigma_data

#----------------------------------------------------------------------------
# The tangent (docs/scm.md §3).

def directional_derivative(fn, primals, tangents, fd_step=None):
    """d/dh fn(*(primals + h tangents)) at h = 0: by torch.func.jvp (exact forward-mode AD) or, with
    fd_step, by the central difference of that step, for kernels without forward-mode support."""
    if fd_step is None:
        return torch.func.jvp(fn, primals, tangents)[1]
    plus = fn(*[p + fd_step * v for p, v in zip(primals, tangents)])
    minus = fn(*[p - fd_step * v for p, v in zip(primals, tangents)])
    return (plus - minus) / (2 * fd_step)

#----------------------------------------------------------------------------
# The loss (docs/scm.md §2-§4).

PRIOR_WEIGHTS = ('inv_sigma', 'flat')
_SPATIAL = (1, 2, 3)


class ContinuousConsistencyLoss:
    """The sCM loss with the training-method interface (training/training_loop.py); SCDLoss and SCTLoss
    say where the velocity dx_t/dt of the probability-flow ODE comes from.

    S:                  sampling steps recorded in student snapshots (generate_images.py's TrigFlow sampler).
    sigma_max:          the sampler's first noise level, t_max = atan(sigma_max / sigma_data); training noise
                        levels above it are drawn as sigma_max.
    P_mean, P_std:      log-normal training noise, ln(sigma_data tan t) ~ N(P_mean, P_std^2).
    tangent_warmup_kimg: thousands of images over which the warm-up weight r of the tangent's second term
                        grows linearly from 0 to 1 (0: r = 1 from the start).
    tangent_norm, tangent_c: normalise the tangent g to g / (rms(g) + tangent_c).
    adaptive_weight:    weight each t by exp(-u(t)) with the network's learned log-variance u, plus u.
    prior_weight:       'inv_sigma', 1 / (sigma_data tan t), or 'flat'.
    fd_step:            None: the tangent by a JVP; a positive step: by a central difference of that step.
    time_bandwidth:     factor on the frequencies of the U-Net's Fourier time embedding (1: EDM2's own).
    sigma_data:         TrigFlow's data standard deviation (EDM2's 0.5).
    report_stats:       report SCM/... diagnostics through torch_utils.training_stats.
    """

    # Command-line options of --method=scd and --method=sct: option -> (constructor argument, type, help).
    OPTIONS = {
        'scm_steps':          ('S', int, 'Student sampling steps of the TrigFlow sampler'),
        'sigma_max':          ('sigma_max', float, 'Highest noise level of the grids'),
        'scm_P_mean':         ('P_mean', float, 'Mean of ln(sigma) of the training noise'),
        'scm_P_std':          ('P_std', float, 'Std of ln(sigma) of the training noise'),
        'scm_warmup_kimg':    ('tangent_warmup_kimg', float, 'Thousands of images over which the tangent warm-up '
                               'weight grows from 0 to 1'),
        'scm_tangent_norm':   ('tangent_norm', bool, 'Normalise the tangent g to g / (rms(g) + c)'),
        'scm_tangent_c':      ('tangent_c', float, 'The constant c of the tangent normalisation'),
        'scm_adaptive':       ('adaptive_weight', bool, 'Weight the loss by the learned log-variance head'),
        'scm_weight':         ('prior_weight', PRIOR_WEIGHTS, 'Prior loss weight: 1/sigma or flat'),
        'scm_fd_step':        ('fd_step', float, 'Tangent by a central finite difference of this step instead of '
                               'a JVP [default: JVP]'),
        'scm_time_bandwidth': ('time_bandwidth', float, 'Factor on the frequencies of the U-Net\'s Fourier time '
                               'embedding (1: EDM2\'s)'),
    }
    METHOD = None  # the --method name, for snapshots

    def __init__(self, S=2, sigma_max=80.0, P_mean=-1.0, P_std=1.4, tangent_warmup_kimg=20480, tangent_norm=True,
            tangent_c=0.1, adaptive_weight=True, prior_weight='inv_sigma', fd_step=None, time_bandwidth=1.0,
            sigma_data=0.5, report_stats=True):
        self.S, self.sigma_max = S, float(sigma_max)
        self.P_mean, self.P_std = float(P_mean), float(P_std)
        self.tangent_warmup_kimg = float(tangent_warmup_kimg)
        self.tangent_norm, self.tangent_c = bool(tangent_norm), float(tangent_c)
        self.adaptive_weight, self.prior_weight = bool(adaptive_weight), prior_weight
        self.fd_step = None if fd_step is None else float(fd_step)
        self.time_bandwidth, self.sigma_data = float(time_bandwidth), float(sigma_data)
        self.report_stats = bool(report_stats)
        self._validate()
        self.progress_kimg = 0.0
        self._encoder = None  # the run's, for sampling baselines

    def _validate(self):
        def require(ok, option, what):
            if not ok:
                raise dnnlib.UserError(f'sCM: {what}', option=option)
        positive = lambda value: math.isfinite(value) and value > 0
        require(isinstance(self.S, int) and not isinstance(self.S, bool) and self.S >= 1, 'S',
            f'the student needs at least 1 sampling step, got {self.S!r}')
        require(positive(self.sigma_max), 'sigma_max', f'sigma_max must be positive, got {self.sigma_max}')
        require(math.isfinite(self.P_mean), 'P_mean', f'P_mean must be finite, got {self.P_mean}')
        require(positive(self.P_std), 'P_std', f'P_std must be positive, got {self.P_std}')
        require(math.isfinite(self.tangent_warmup_kimg) and self.tangent_warmup_kimg >= 0, 'tangent_warmup_kimg',
            f'the warm-up length must be >= 0, got {self.tangent_warmup_kimg}')
        require(positive(self.tangent_c), 'tangent_c', f'tangent_c must be positive, got {self.tangent_c}')
        require(self.prior_weight in PRIOR_WEIGHTS, 'prior_weight',
            f'prior_weight must be one of {PRIOR_WEIGHTS}, got {self.prior_weight!r}')
        require(self.fd_step is None or positive(self.fd_step), 'fd_step',
            f'the finite-difference step must be positive, got {self.fd_step}')
        require(positive(self.time_bandwidth), 'time_bandwidth',
            f'time_bandwidth must be positive, got {self.time_bandwidth}')
        require(positive(self.sigma_data), 'sigma_data', f'sigma_data must be positive, got {self.sigma_data}')

    def hyperparameters(self):
        """The settings that define the objective; a resumed run must use the same ones."""
        names = ('S', 'sigma_max', 'P_mean', 'P_std', 'tangent_warmup_kimg', 'tangent_norm', 'tangent_c',
            'adaptive_weight', 'prior_weight', 'fd_step', 'time_bandwidth', 'sigma_data')
        return {name: getattr(self, name) for name in names}

    #------------------------------------------------------------------------
    # The training-method hooks (training/training_loop.py).

    def prepare(self, encoder, latent_shape, label_dim, device):
        self._encoder = encoder

    def init_network(self, net):
        """Apply time_bandwidth; without adaptive weighting the log-variance head gets no gradient."""
        if self.time_bandwidth != 1:
            with torch.no_grad():
                net.unet.emb_fourier.freqs.mul_(self.time_bandwidth)
        if not self.adaptive_weight:
            pretrained.freeze_parameters(net, ['logvar_linear'])

    def set_progress(self, cur_nimg):
        """Set the training progress (images seen so far), which drives the tangent warm-up."""
        self.progress_kimg = cur_nimg / 1e3

    def snapshot_entries(self):
        """The 'cd' entry of student snapshots: generate_images.py samples them with the TrigFlow sampler."""
        return dict(cd=dnnlib.EasyDict(method=self.METHOD, sampler='trigflow', S=self.S, sigma_max=self.sigma_max,
            sigma_data=self.sigma_data, loss_kwargs=self.hyperparameters()))

    def state_dict(self):
        return dict(hyperparameters=self.hyperparameters(), progress_kimg=self.progress_kimg)

    def load_state_dict(self, state):
        """Restore the progress; the settings stay as constructed and must be those of the training state."""
        saved, current = state['hyperparameters'], self.hyperparameters()
        differing = [f'{name}: training state {saved.get(name, "<missing>")!r}, now {current.get(name, "<missing>")!r}'
            for name in sorted(saved.keys() | current.keys()) if saved.get(name) != current.get(name)]
        if differing:
            raise dnnlib.UserError('The training state was made with other sCM settings; resume with the same ones '
                'or start a new run. Differences: ' + '; '.join(differing))
        self.progress_kimg = float(state['progress_kimg'])

    def __getstate__(self):
        return dict(self.__dict__, _encoder=None)

    def _baselines(self, network, net, heun):
        """`net` sampled with Euler (DDIM) on EDM's S-step grid and, with `heun`, with EDM2's Heun sampler."""
        data = dict(ema=net, encoder=self._encoder)
        baselines = [dnnlib.EasyDict(network=network, data=data, sampler='euler',
            sampler_kwargs=dict(num_steps=self.S, sigma_max=self.sigma_max))]
        if heun:
            baselines.append(dnnlib.EasyDict(network=network, data=data, sampler='heun', sampler_kwargs={}))
        return baselines

    #------------------------------------------------------------------------
    # Loss evaluation.

    def __call__(self, net, images, labels=None):
        """Per-sample loss [N, 1, 1, 1], as the training loop sums it."""
        sd = self.sigma_data
        t = self.draw_times(images)
        z = torch.randn_like(images) * sd
        x_t = t.cos() * images + t.sin() * z
        with torch.no_grad():
            dxdt = self.ode_velocity(x_t, t, labels, images, z)

        rng = (images.device, device_rng_state(images.device))  # the JVP replays the forward's dropout masks
        x, sigma = edm_coordinates(x_t, t, sd)
        if self.adaptive_weight:
            denoised, logvar = net(x, sigma, labels, return_logvar=True)
        else:
            denoised, logvar = net(x, sigma, labels), torch.zeros_like(t)
        F = velocity_from_denoised(x_t, t, denoised.to(torch.float32)) / sd
        g = self.tangent_target(x_t, t, F.detach(), dxdt, self.student_tangent(misc.unwrap_ddp(net), x_t, t, dxdt,
            labels, rng))

        # The value is mean(g^2); the gradient, -2 g dF/dtheta / D, is that of the continuous-time CM objective.
        mse = (F - F.detach() - g).square().mean(dim=_SPATIAL, keepdim=True)
        weight = 1 / (sd * t.tan()) if self.prior_weight == 'inv_sigma' else torch.ones_like(t)
        logvar = logvar.to(torch.float32).reshape(t.shape)
        if self.report_stats:
            training_stats.report('SCM/sigma', sd * t.tan())
            training_stats.report('SCM/logvar', logvar.detach())
        return weight * (-logvar).exp() * mse + logvar

    def draw_times(self, images):
        """TrigFlow times t = atan(sigma / sigma_data) of log-normal noise levels sigma <= sigma_max, [N, 1, 1, 1]."""
        ln_sigma = self.P_mean + self.P_std * torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        return (ln_sigma.exp().clamp(max=self.sigma_max) / self.sigma_data).atan()

    def warmup(self):
        """The tangent warm-up weight r in [0, 1]."""
        return 1.0 if self.tangent_warmup_kimg == 0 else min(self.progress_kimg / self.tangent_warmup_kimg, 1.0)

    def student_tangent(self, student, x_t, t, dxdt, labels, rng):
        """sin t cos t dF/dt: the JVP of the student's F(x_t / sigma_data, t) along the ODE, with tangents
        sin t cos t (dx_t/dt / sigma_data, 1) (docs/scm.md §3). No gradient; `rng` (device, state) is replayed
        for each evaluation, so that dropout masks match the gradient pass."""
        view = TrigFlowView(student, self.sigma_data)

        def F(x_scaled, time):
            with replayed_rng(*rng):
                return view.F(x_scaled, time, labels)

        scale = t.sin() * t.cos()
        with torch.no_grad(), suppress_inplace_weight_norm(student):
            return directional_derivative(F, (x_t / self.sigma_data, t), (scale * dxdt / self.sigma_data, scale),
                self.fd_step)

    def tangent_target(self, x_t, t, F_minus, dxdt, tangent):
        """The normalised tangent g = cos t df/dt, with the warm-up weight r on its second term (docs/scm.md §3):
        g = -cos^2 t (sigma_data F - dx_t/dt) - r (sin t cos t x_t + sigma_data sin t cos t dF/dt)."""
        r = self.warmup()
        g = -t.cos().square() * (self.sigma_data * F_minus - dxdt) - r * (t.sin() * t.cos() * x_t
            + self.sigma_data * tangent)
        rms = g.square().mean(dim=_SPATIAL, keepdim=True).sqrt()
        if self.report_stats:
            training_stats.report('SCM/tangent_rms', rms)
            training_stats.report('SCM/warmup', r)
        return g / (rms + self.tangent_c) if self.tangent_norm else g

#----------------------------------------------------------------------------
# The two methods.

class SCDLoss(ContinuousConsistencyLoss):
    """sCD: the velocity is the frozen teacher's, dx_t/dt = (cos t x_t - D_T) / sin t, and the student starts from the
    teacher's weights. teacher_net attaches a network directly; teacher_pkl (path or URL) loads one in prepare(),
    teacher_sha256, if given, pins its content."""

    METHOD = 'scd'
    OPTIONS = {
        'teacher': ('teacher_pkl', 'PKL', 'Distil this EDM2 network pickle (path or URL)'),
        **ContinuousConsistencyLoss.OPTIONS,
    }

    def __init__(self, teacher_net=None, teacher_pkl=None, teacher_sha256=None, **scm_kwargs):
        super().__init__(**scm_kwargs)
        self.teacher_pkl, self.teacher_sha256 = teacher_pkl, teacher_sha256
        self.teacher_net = None if teacher_net is None else teacher_net.eval().requires_grad_(False)

    def __getstate__(self):
        return dict(super().__getstate__(), teacher_net=None)

    def prepare(self, encoder, latent_shape, label_dim, device):
        """Load the teacher (unless attached) and check its content and its fit to the data."""
        super().prepare(encoder, latent_shape, label_dim, device)
        if self.teacher_pkl is not None:
            teacher = pretrained.load_pinned(self.teacher_pkl, self.teacher_sha256, '--teacher', 'teacher_pkl',
                'teacher_sha256', 'distils')
            self.teacher_sha256 = teacher.sha256
            pretrained.check_against_data(teacher.net, teacher.encoder, encoder, latent_shape, label_dim,
                argument='teacher_pkl')
            self.teacher_net = teacher.net
        elif self.teacher_net is None:
            raise dnnlib.UserError('sCD needs a teacher network pickle (--teacher=PKL)', option='teacher_pkl')
        self.teacher_net.to(device)

    def pinned_kwargs(self):
        return dict(teacher_sha256=self.teacher_sha256) if self.teacher_pkl is not None else {}

    def architecture(self):
        """The student's architecture: the teacher's."""
        return pretrained.network_kwargs(self.teacher_net)

    def init_network(self, net):
        pretrained.copy_weights(net, self.teacher_net)
        super().init_network(net)

    def validation_baselines(self, heun=True):
        return self._baselines('teacher', self.teacher_net, heun)

    def ode_velocity(self, x_t, t, labels, images, z):
        return TrigFlowView(self.teacher_net, self.sigma_data).velocity(x_t, t, labels)

    def snapshot_entries(self):
        entries = super().snapshot_entries()
        entries['cd'].update(teacher=None if self.teacher_pkl is None else str(self.teacher_pkl))
        return entries


class SCTLoss(ContinuousConsistencyLoss):
    """sCT: the velocity is the data's one-sample estimate dx_t/dt = cos t z - sin t x_0 of the noise z and the clean
    sample x_0 behind x_t. Training starts from random weights or from init_pkl (path or URL of a network pickle,
    pinned by init_sha256 if given)."""

    METHOD = 'sct'
    OPTIONS = {
        'init': ('init_pkl', 'PKL', INIT_HELP),
        **ContinuousConsistencyLoss.OPTIONS,
    }

    def __init__(self, init_pkl=None, init_sha256=None, **scm_kwargs):
        super().__init__(**scm_kwargs)
        self.init_pkl, self.init_sha256 = init_pkl, init_sha256
        self.init_net = None

    def __getstate__(self):
        return dict(super().__getstate__(), init_net=None)

    def prepare(self, encoder, latent_shape, label_dim, device):
        """Load the starting network (if any) and check its content and its fit to the data."""
        super().prepare(encoder, latent_shape, label_dim, device)
        if self.init_pkl is None:
            return
        init = pretrained.load_starting_network(self.init_pkl, self.init_sha256, encoder, latent_shape, label_dim)
        self.init_net, self.init_sha256 = init.net, init.sha256

    def pinned_kwargs(self):
        return dict(init_sha256=self.init_sha256) if self.init_pkl is not None else {}

    def architecture(self):
        """The starting network's architecture with --init; from scratch, the preset's (None)."""
        return None if self.init_net is None else pretrained.network_kwargs(self.init_net, role='starting network')

    def init_network(self, net):
        if self.init_net is not None:
            pretrained.copy_weights(net, self.init_net, role='starting network')
        super().init_network(net)

    def validation_baselines(self, heun=True):
        return [] if self.init_net is None else self._baselines('init', self.init_net, heun)

    def ode_velocity(self, x_t, t, labels, images, z):
        return t.cos() * z - t.sin() * images

    def snapshot_entries(self):
        entries = super().snapshot_entries()
        entries['cd'].update(teacher=None, init=None if self.init_pkl is None else str(self.init_pkl))
        return entries

#----------------------------------------------------------------------------
