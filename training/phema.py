"""Power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", Sec. 3) and the least-squares solver for post-hoc EMA reconstruction.

An EMA profile with exponent gamma averages the training trajectory up to time t with weight
proportional to tau^gamma; its relative standard deviation is sigma_rel = exp_to_std(gamma).
"""

import copy

import numpy as np
import torch

MAX_STD = float(np.sqrt(1 / 12))  # sigma_rel of the uniform average (gamma = 0)


def exp_to_std(exp):
    """Relative standard deviation of the power-function profile with exponent `exp`."""
    gamma = np.asarray(exp, dtype=np.float64)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))[()]


def _exp_for_std(std):
    # exp_to_std(gamma) = std  <=>  (gamma + 2)^2 (gamma + 3) - (gamma + 1) / std^2 = 0
    inv_var = 1 / std ** 2
    roots = np.roots([1.0, 7.0, 16.0 - inv_var, 12.0 - inv_var])
    return max(root.real for root in roots if abs(root.imag) <= 1e-9 * max(abs(root), 1))


def std_to_exp(std):
    """Exponent gamma whose profile has relative standard deviation `std` (0 < std < 1/sqrt(12))."""
    stds = np.asarray(std, dtype=np.float64)
    if np.any(~(stds > 0)) or np.any(~(stds < MAX_STD)):
        raise ValueError(f'EMA std must lie in (0, {MAX_STD:.4f}), got {std}')
    gammas = np.array([_exp_for_std(s) for s in stds.flat], dtype=np.float64)
    return gammas.reshape(stds.shape)[()]


def power_function_beta(std, t_next, t_delta):
    """Decay factor for the step that advances training time from t_next - t_delta to t_next."""
    return (1 - t_delta / t_next) ** (std_to_exp(std) + 1)


def _frozen_copy(net):
    return copy.deepcopy(net).eval().requires_grad_(False)


@torch.no_grad()
def _blend_parameters(ema, net, weight):
    for ema_param, net_param in zip(ema.parameters(), net.parameters()):
        ema_param.lerp_(net_param.detach(), weight)


@torch.no_grad()
def _copy_buffers(dst, src):
    for dst_buf, src_buf in zip(dst.buffers(), src.buffers()):
        dst_buf.copy_(src_buf)


class PowerFunctionEMA:
    """One power-function EMA of `net`'s parameters for each relative std in `stds`."""

    def __init__(self, net, stds=[0.050, 0.100]):
        self.net = net
        self.stds = list(stds)
        self.emas = [_frozen_copy(net) for _std in self.stds]

    def reset(self):
        for ema in self.emas:
            _blend_parameters(ema, self.net, 1.0)  # weight 1 is an exact copy

    def update(self, cur_nimg, batch_size):
        """Account for a training step of `batch_size` images that brought the total to `cur_nimg`."""
        for std, ema in zip(self.stds, self.emas):
            beta = power_function_beta(std=std, t_next=cur_nimg, t_delta=batch_size)
            _blend_parameters(ema, self.net, float(1 - beta))

    def get(self):
        """List of (averaged net, file-name suffix); buffers are refreshed from the live net."""
        for ema in self.emas:
            _copy_buffers(ema, self.net)
        return [(ema, f'-{std:.3f}') for std, ema in zip(self.stds, self.emas)]

    def state_dict(self):
        return dict(stds=self.stds, emas=[ema.state_dict() for ema in self.emas])

    def load_state_dict(self, state):
        if len(state['emas']) != len(self.emas):
            raise ValueError(f'EMA state holds {len(state["emas"])} averages, expected {len(self.emas)} (stds {self.stds})')
        self.stds = list(state['stds'])
        for ema, ema_state in zip(self.emas, state['emas']):
            ema.load_state_dict(ema_state)


class TraditionalEMA:
    """Exponential moving average with a half-life in Mimg, ramped up as a fraction of progress."""

    def __init__(self, net, halflife_Mimg=float('inf'), rampup_ratio=0.09):
        self.net = net
        self.halflife_Mimg = halflife_Mimg
        self.rampup_ratio = rampup_ratio
        self.ema = _frozen_copy(net)

    def reset(self):
        _blend_parameters(self.ema, self.net, 1.0)

    def update(self, cur_nimg, batch_size):
        halflife_nimg = self.halflife_Mimg * 1e6
        if self.rampup_ratio is not None:
            halflife_nimg = min(halflife_nimg, cur_nimg * self.rampup_ratio)
        beta = 0.5 ** (batch_size / max(halflife_nimg, 1e-8))
        _blend_parameters(self.ema, self.net, float(1 - beta))

    def get(self):
        """Single-element list of (averaged net, ''), matching PowerFunctionEMA.get()."""
        _copy_buffers(self.ema, self.net)
        return [(self.ema, '')]

    def state_dict(self):
        return self.ema.state_dict()

    def load_state_dict(self, state):
        self.ema.load_state_dict(state)


def _profile_overlap(t_a, gamma_a, t_b, gamma_b):
    """Inner product of two normalized power-function profiles ending at t_a and t_b."""
    later = np.maximum(t_a, t_b)
    ratio_exp = np.where(t_a < t_b, gamma_b, -gamma_a)
    scale = (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * later)
    return scale * (t_a / t_b) ** ratio_exp


def solve_posthoc_coefficients(in_nimg, in_std, out_nimg, out_std):
    """Least-squares weights that combine input snapshots into the requested output profiles.

    Inputs are snapshots taken at times `in_nimg` with relative stds `in_std`; outputs are
    profiles at `out_nimg` with stds `out_std`. Returns float64 [num_inputs, num_outputs] with
    each column summing to 1.
    """
    in_t, in_gamma = [np.ravel(x).astype(np.float64) for x in np.broadcast_arrays(in_nimg, std_to_exp(in_std))]
    out_t, out_gamma = [np.ravel(x).astype(np.float64) for x in np.broadcast_arrays(out_nimg, std_to_exp(out_std))]
    gram = _profile_overlap(in_t[:, None], in_gamma[:, None], in_t[None, :], in_gamma[None, :])
    targets = _profile_overlap(in_t[:, None], in_gamma[:, None], out_t[None, :], out_gamma[None, :])
    coefs = np.linalg.solve(gram, targets)
    return coefs / coefs.sum(axis=0, keepdims=True)
