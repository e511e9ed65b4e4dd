"""EDM2 training with the consistency term of Consistent Diffusion Models (Daras et al. 2023).

A diffusion model's denoiser D(x; sigma) is consistent when its prediction at a noise level sigma_t
equals the expected prediction it makes after its own sampler has carried x_t further down to a
lower level sigma_s: D(x_t; sigma_t) = E[D(x_s; sigma_s) | x_t]. Plain denoising score matching only
trains D on noised data, while sampling feeds it its own iterates; asking for consistency along the
sampler's path trains it there as well, which is what CDM proposes against sampling drift.

Per training example this loss adds, to EDM2's per-element loss (training_loop.EDM2Loss, called
unchanged), `weight` times an unbiased estimate of the squared consistency gap:

    sigma_t, x_t = y + sigma_t * eps   the noise level and noisy input that EDM2Loss drew
    sigma_s      = max(sigma_t - u, min(sigma_t, sigma_min)),  u ~ U[gap_min, gap_max]
    x_s^(1), x_s^(2)                   two independent runs of the reverse SDE from x_t down to sigma_s,
                                       `num_steps` Euler-Maruyama steps of the model itself, no gradient
    term         = (D(x_s^(1); sigma_s) - D(x_t; sigma_t)) * (D(x_s^(2); sigma_s) - D(x_t; sigma_t))

Because the two runs are independent given x_t, the expectation of the product is the squared
difference |E[D(x_s; sigma_s) | x_t] - D(x_t; sigma_t)|^2 element by element. Gradients reach the
network through all three predictions (the sampled x_s carry none). The reverse-SDE step from sigma
to sigma' < sigma on EDM's axis (x = y + sigma * eps) is

    x' = x + 2 (sigma' - sigma) (x - D(x; sigma)) / sigma + sqrt(2 sigma (sigma - sigma')) z,  z ~ N(0, I),

on a Karras grid (exponent rho) of num_steps + 1 levels from sigma_t to sigma_s. Examples whose
sigma_t lies at or below sigma_min get sigma_s = sigma_t, and their term vanishes.

Random numbers: EDM2Loss draws first, exactly as in plain EDM2 training; the term then draws u
([N, 1, 1, 1], torch.rand) and, for each sampler step, one torch.randn tensor shaped like the two
stacked chains ([2N, C, H, W]). With weight 0 the term is skipped, so nothing extra is drawn and the
loss equals EDM2Loss's for the same seed.

The sampler and the second prediction run on the network itself (not on a DDP wrapper: gradients of
its parameters are still reduced by the wrapper's one forward inside EDM2Loss), in training mode, as
does the training pass, and without rewriting the EDM2 weights in place (networks_edm2.
suppress_inplace_weight_norm), which would invalidate the graph of the first forward.

Pickling: snapshots of a cdm run are ordinary EDM2 network pickles. snapshot_entries() gives them the
EDM2Loss that CDMLoss wraps (same P_mean, P_std, sigma_data), not CDMLoss itself. A persistent
CDMLoss would carry this module's source, which imports this project's training_loop and
networks_edm2 helpers that EDM2's own code base lacks, so EDM2 could not unpickle it; and the loss
object is of no use for sampling. CDMLoss is therefore a plain class. Training states keep only its
settings (state_dict), and resuming refuses other ones.
"""

import math

import torch

import dnnlib
from torch_utils import misc
from torch_utils import training_stats
from training.networks_edm2 import suppress_inplace_weight_norm
from training.training_loop import EDM2Loss

#----------------------------------------------------------------------------


def _stack_twice(tensor):
    return None if tensor is None else torch.cat([tensor, tensor])


class _ForwardTap:
    """Calls `net` and keeps the inputs and the denoised output of each call (gradients intact)."""

    def __init__(self, net):
        self.net = net
        self.calls = []

    def __call__(self, x, sigma, labels=None, **kwargs):
        out = self.net(x, sigma, labels, **kwargs)
        denoised = out[0] if isinstance(out, tuple) else out
        self.calls.append(dnnlib.EasyDict(x=x, sigma=sigma, labels=labels, denoised=denoised))
        return out


def karras_levels(sigma_hi, sigma_lo, num_steps, rho):
    """num_steps + 1 levels per example from sigma_hi down to sigma_lo, uniform in sigma^(1/rho).

    sigma_hi, sigma_lo: [N, 1, 1, 1]. Returns a list of num_steps + 1 tensors of that shape; the
    first is exactly sigma_hi and the last exactly sigma_lo.
    """
    hi, lo = sigma_hi ** (1 / rho), sigma_lo ** (1 / rho)
    levels = [(hi + (k / num_steps) * (lo - hi)) ** rho for k in range(num_steps + 1)]
    levels[0], levels[-1] = sigma_hi, sigma_lo
    return levels


def reverse_sde_step(x, denoised, sigma, sigma_next, z):
    """One Euler-Maruyama step of the reverse SDE of x = y + sigma * eps from sigma down to sigma_next."""
    drop = sigma - sigma_next
    return x - 2 * drop * (x - denoised) / sigma + (2 * sigma * drop).clamp(min=0).sqrt() * z


class CDMLoss:
    """EDM2's loss plus CDM's consistency term, as a training method (training/training_loop.py).

    P_mean, P_std, sigma_data: EDM2Loss's settings (log-normal training noise, data std).
    weight:     factor of the consistency term; 0 gives plain EDM2 training.
    num_steps:  reverse-SDE steps that carry x_t from sigma_t down to sigma_s.
    gap_min, gap_max: sigma_t - sigma_s is drawn uniformly from [gap_min, gap_max] (in sigma units).
    sigma_min:  lowest sigma_s; examples with sigma_t at or below it get no term.
    rho:        exponent of the Karras grid between sigma_t and sigma_s.
    report_stats: report CDM/... statistics through torch_utils.training_stats.
    """

    # Command-line options of --method=cdm: option -> (constructor argument, type, help).
    OPTIONS = {
        **EDM2Loss.OPTIONS,
        'cdm_weight':  ('weight', float, 'Factor of the consistency term added to the EDM2 loss (0: plain EDM2)'),
        'cdm_steps':   ('num_steps', int, 'Reverse-SDE steps of the model from sigma_t to sigma_s for the consistency target'),
        'cdm_gap_min': ('gap_min', float, 'Smallest noise-level gap sigma_t - sigma_s of the consistency term'),
        'cdm_gap_max': ('gap_max', float, 'Largest noise-level gap sigma_t - sigma_s (drawn uniformly in between)'),
    }

    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5, weight=10.0, num_steps=5, gap_min=0.0, gap_max=0.05,
            sigma_min=0.002, rho=7.0, report_stats=True):
        self.edm2 = EDM2Loss(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)  # checks P_std
        self.weight, self.num_steps = float(weight), num_steps
        self.gap_min, self.gap_max = float(gap_min), float(gap_max)
        self.sigma_min, self.rho = float(sigma_min), float(rho)
        self.report_stats = bool(report_stats)
        self._validate()

    def _validate(self):
        def require(ok, option, what):
            if not ok:
                raise dnnlib.UserError(f'CDM training: {what}', option=option)
        require(math.isfinite(self.weight) and self.weight >= 0, 'weight',
            f'the consistency weight must be finite and >= 0, got {self.weight}')
        require(isinstance(self.num_steps, int) and not isinstance(self.num_steps, bool) and self.num_steps >= 1,
            'num_steps', f'the sampler needs at least 1 step, got {self.num_steps!r}')
        require(math.isfinite(self.gap_min) and self.gap_min >= 0, 'gap_min', f'gap_min must be >= 0, got {self.gap_min}')
        require(math.isfinite(self.gap_max) and self.gap_max >= self.gap_min and self.gap_max > 0, 'gap_max',
            f'gap_max must be positive and >= gap_min = {self.gap_min}, got {self.gap_max}')
        require(math.isfinite(self.sigma_min) and self.sigma_min > 0, 'sigma_min',
            f'sigma_min must be positive, got {self.sigma_min}')
        require(math.isfinite(self.rho) and self.rho > 0, 'rho', f'rho must be positive, got {self.rho}')

    @property
    def P_mean(self):
        return self.edm2.P_mean

    @property
    def P_std(self):
        return self.edm2.P_std

    @property
    def sigma_data(self):
        return self.edm2.sigma_data

    def hyperparameters(self):
        """The settings that define the objective; a resumed run must use the same ones."""
        names = ('P_mean', 'P_std', 'sigma_data', 'weight', 'num_steps', 'gap_min', 'gap_max', 'sigma_min', 'rho')
        return {name: getattr(self, name) for name in names}

    #------------------------------------------------------------------------
    # The training-method hooks (training/training_loop.py).

    def snapshot_entries(self):
        """Snapshots are plain EDM2 pickles: their loss_fn is the wrapped EDM2Loss."""
        return dict(loss_fn=self.edm2)

    def state_dict(self):
        return self.hyperparameters()

    def load_state_dict(self, state):
        """Check that a training state was made with these settings; the settings stay as constructed."""
        current = self.hyperparameters()
        differing = [f'{name}: training state {state.get(name, "<missing>")!r}, now {current.get(name, "<missing>")!r}'
            for name in sorted(set(state) | set(current)) if state.get(name) != current.get(name)]
        if differing:
            raise dnnlib.UserError('The training state was made with other CDM settings; resume with the same ones '
                'or start a new run. Differences: ' + '; '.join(differing))

    #------------------------------------------------------------------------
    # Loss evaluation.

    def __call__(self, net, images, labels=None):
        """Per-element loss [N, C, H, W]: EDM2Loss's plus weight * the consistency term."""
        tap = _ForwardTap(net)
        loss = self.edm2(tap, images, labels)
        if self.weight == 0:
            return loss
        if len(tap.calls) != 1:
            raise RuntimeError(f'CDMLoss expects EDM2Loss to evaluate the network once, it did {len(tap.calls)} times')
        first = tap.calls[0]
        term = self.consistency_term(net, first.x, first.sigma, first.labels, first.denoised)
        return loss + self.weight * term

    def draw_sigma_s(self, sigma_t):
        """sigma_s for each example ([N, 1, 1, 1] like sigma_t): sigma_t minus a uniform gap, kept >= sigma_min."""
        gap = self.gap_min + (self.gap_max - self.gap_min) * torch.rand(sigma_t.shape, device=sigma_t.device)
        floor = torch.clamp(sigma_t, max=self.sigma_min)  # never above sigma_t
        return torch.maximum(sigma_t - gap.to(sigma_t.dtype), floor)

    @torch.no_grad()
    def run_sampler(self, net, x_t, sigma_t, sigma_s, labels):
        """Two independent reverse-SDE runs from x_t to sigma_s, stacked as [2N, ...] (chain 1, then chain 2)."""
        levels = karras_levels(_stack_twice(sigma_t), _stack_twice(sigma_s), self.num_steps, self.rho)
        labels = _stack_twice(labels)
        x = _stack_twice(x_t.detach()).to(torch.float32)
        with suppress_inplace_weight_norm(net):
            for sigma, sigma_next in zip(levels[:-1], levels[1:]):
                denoised = net(x, sigma, labels).to(torch.float32)
                z = torch.randn_like(x)
                x = reverse_sde_step(x, denoised, sigma, sigma_next, z)
        return x

    def consistency_term(self, net, x_t, sigma_t, labels, denoised_t):
        """Per-element CDM term for noisy inputs x_t at sigma_t ([N, 1, 1, 1]) whose prediction is denoised_t."""
        student = misc.unwrap_ddp(net)
        sigma_s = self.draw_sigma_s(sigma_t)
        x_s = self.run_sampler(student, x_t, sigma_t, sigma_s, labels)
        with suppress_inplace_weight_norm(student):
            denoised_s = student(x_s, _stack_twice(sigma_s), _stack_twice(labels)).to(torch.float32)
        first, second = denoised_s.chunk(2)
        anchor = denoised_t.to(torch.float32)
        term = (first - anchor) * (second - anchor)
        if self.report_stats:
            training_stats.report('CDM/consistency', term.detach())
            training_stats.report('CDM/sigma_gap', (sigma_t - sigma_s).detach())
        return term

#----------------------------------------------------------------------------
