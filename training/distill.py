"""Teacher handling for consistency distillation: load a frozen teacher from a network pickle,
check it against the run's data and encoder, and seed a student with its weights."""

import pickle

import numpy as np
import torch

import dnnlib
from torch_utils import misc

#----------------------------------------------------------------------------

class TeacherError(ValueError):
    """The teacher pickle cannot be used for this run."""


def load_teacher_pickle(source):
    """Read a network pickle (EDM2's or one of ours) and return (teacher_net, teacher_encoder or None).
    The network is the 'ema' entry, or 'net' for pickles that store the raw training network."""
    try:
        with dnnlib.util.open_url(source, verbose=False) as f:
            data = pickle.load(f)
    except FileNotFoundError as err:
        raise TeacherError(f'--teacher: {source} does not exist; distillation (and resuming it) needs the teacher '
            'network pickle at that path') from err
    net = data.get('ema', data.get('net')) if isinstance(data, dict) else None
    if not isinstance(net, torch.nn.Module):
        raise TeacherError(f'--teacher: {source} is not a network pickle; expected a dict with an "ema" (or "net") network')
    net = net.eval().requires_grad_(False)
    return net, data.get('encoder')


def teacher_network_kwargs(teacher):
    """Constructor keywords that rebuild the teacher's architecture as our Precond (without the
    interface sizes, which the training loop derives from the data)."""
    kwargs = teacher.init_kwargs
    if kwargs is None:
        raise TeacherError(f'the teacher ({type(teacher).__name__}) does not record its constructor arguments; '
            'expected an EDM2 Precond from a network pickle')
    for key in ('img_resolution', 'img_channels', 'label_dim'):
        kwargs.pop(key, None)
    return dnnlib.EasyDict(class_name='training.networks_edm2.Precond', **kwargs)


def _encoder_signature(encoder):
    fields = {name: np.asarray(getattr(encoder, name)) for name in ('vae_name', 'scale', 'bias') if hasattr(encoder, name)}
    return type(encoder).__name__, fields


def check_teacher(teacher, teacher_encoder, encoder, latent_shape, label_dim):
    """Raise one TeacherError listing every way the teacher does not fit the run's data and encoder."""
    problems = []
    channels, resolution = latent_shape[1], latent_shape[-1]
    if teacher.img_resolution != resolution:
        problems.append(f'resolution: teacher {teacher.img_resolution}, data {resolution}')
    if teacher.img_channels != channels:
        problems.append(f'channels: teacher {teacher.img_channels}, data (after the encoder) {channels}')
    if teacher.label_dim != label_dim:
        problems.append(f'label dimension: teacher {teacher.label_dim}, data {label_dim} (see --cond)')
    if teacher_encoder is not None:
        (teacher_kind, teacher_fields), (run_kind, run_fields) = _encoder_signature(teacher_encoder), _encoder_signature(encoder)
        if teacher_kind != run_kind:
            problems.append(f'encoder: teacher {teacher_kind}, run {run_kind}')
        else:
            for name in teacher_fields.keys() | run_fields.keys():
                a, b = teacher_fields.get(name), run_fields.get(name)
                same = a is not None and b is not None and a.shape == b.shape and (
                    np.array_equal(a, b) if a.dtype.kind in 'US' else np.allclose(a, b))
                if not same:
                    problems.append(f'encoder {name}: teacher {a}, run {b}')
    if problems:
        raise TeacherError('the teacher does not match the training data: ' + '; '.join(problems))


def seed_student_from_teacher(student, teacher):
    """Copy every parameter and buffer of the teacher into the student, after checking that all
    names and shapes agree (a half-seeded student is never left behind)."""
    source = dict(misc.named_params_and_buffers(teacher))
    target = dict(misc.named_params_and_buffers(student))
    missing = sorted(target.keys() - source.keys())
    extra = sorted(source.keys() - target.keys())
    mismatched = [f'{name} {tuple(source[name].shape)} vs {tuple(tensor.shape)}'
        for name, tensor in target.items() if name in source and source[name].shape != tensor.shape]
    if missing or extra or mismatched:
        raise TeacherError(f'cannot seed the student from the teacher: missing in teacher {missing[:5]}, '
            f'not in student {extra[:5]}, shape mismatches {mismatched[:5]}')
    with torch.no_grad():
        for name, tensor in target.items():
            tensor.copy_(source[name])


def snapshot_metadata(loss_fn, teacher_source):
    """The 'cd' entry of student snapshots: what generate_images.py needs to sample in S steps."""
    return dnnlib.EasyDict(S=loss_fn.S, sigma_min=loss_fn.sigma_min, sigma_max=loss_fn.sigma_max, rho=loss_fn.rho,
        student_sigmas=loss_fn.student_sigmas().tolist(), teacher=str(teacher_source),
        loss_kwargs=loss_fn.hyperparameters())

#----------------------------------------------------------------------------
