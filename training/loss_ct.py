"""Multistep consistency training (CT): the student grid, edges and targets of multistep consistency
distillation (training/loss_cd.py), without a teacher. Where CD integrates the teacher's ODE from
sigma_t to sigma_s, CT uses the data's own one-sample estimate of that hop: for x_t = y + sigma_t * eps
it lands at y + sigma_s * eps (Song et al. 2023, "Consistency Models", §5; Heek et al. 2024,
"Multistep Consistency Models"). Training starts from random weights or, with init_pkl, from a
pretrained EDM2 network (consistency tuning, as in Geng et al. 2024, "Consistency Models Made Easy").
docs/methods.md compares it with the other methods.
"""

import torch

import dnnlib
from training import pretrained
from training.loss_cd import INIT_HELP, EDMConsistencyDistillLoss

#----------------------------------------------------------------------------

class ConsistencyTrainingLoss(EDMConsistencyDistillLoss):
    """Multistep CT with the interface and the settings of EDMConsistencyDistillLoss (minus the
    teacher); init_pkl (path or URL of a network pickle) gives the starting weights and the
    architecture, and init_sha256, if given, pins its content."""

    # Command-line options of --method=ct: those of --method=cd without the teacher; --init starts from random
    # weights when absent.
    OPTIONS = {
        'init': ('init_pkl', 'PKL', INIT_HELP),
        **{name: spec for name, spec in EDMConsistencyDistillLoss.OPTIONS.items()
            if name not in ('init', 'teacher', 'terminal_teacher_hop', 'teacher_solver', 'addim_eta', 'guide', 'guidance')},
    }

    def __init__(self, init_pkl=None, init_sha256=None, **cd_kwargs):
        # A teacher's settings are refused unless they keep their defaults (the defaults change nothing here).
        defaults = dict(teacher_net=None, teacher_pkl=None, teacher_sha256=None, terminal_teacher_hop=False,
            teacher_solver='heun', addim_eta=None, guide_net=None, guide_pkl=None, guide_sha256=None, guidance=1.0)
        for name, default in defaults.items():
            if cd_kwargs.get(name, default) not in (default, None):
                raise dnnlib.UserError(f'consistency training has no teacher, so it takes no {name}', option=name)
        super().__init__(init_pkl=init_pkl, init_sha256=init_sha256, **cd_kwargs)

    def prepare(self, encoder, latent_shape, label_dim, device):
        """Load the starting network (if any) and check its content and its fit to the data."""
        self._encoder = encoder
        if self.init_pkl is None:
            return
        init = pretrained.load_starting_network(self.init_pkl, self.init_sha256, encoder, latent_shape, label_dim)
        self.init_net, self.init_sha256 = init.net, init.sha256

    def validation_baselines(self, heun=True):
        """The starting network, if any, with the samplers of CD's teacher baselines."""
        return [] if self.init_net is None else self._baselines('init', self.init_net, heun)

    def pinned_kwargs(self):
        return dict(init_sha256=self.init_sha256) if self.init_pkl is not None else {}

    def architecture(self):
        """The starting network's architecture with --init; from scratch, the preset's (None)."""
        return None if self.init_net is None else pretrained.network_kwargs(self.init_net, role='starting network')

    def init_network(self, net):
        """Copy the starting network's weights, if any; the uncertainty head gets no gradient in CT."""
        if self.init_net is not None:
            pretrained.copy_weights(net, self.init_net, role='starting network')
        pretrained.freeze_parameters(net, ['logvar_linear'])

    def ode_hop(self, x_t, sigma_t, sigma_s, labels, images, noise):
        """The data's estimate of the hop: the same noise, scaled to sigma_s."""
        return images + sigma_s.reshape(-1, 1, 1, 1) * noise.to(torch.float64)

    def snapshot_entries(self):
        entries = super().snapshot_entries()
        entries['cd'].update(method='ct', teacher=None, init=None if self.init_pkl is None else str(self.init_pkl))
        return entries

#----------------------------------------------------------------------------
