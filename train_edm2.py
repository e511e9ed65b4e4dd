"""Train an EDM2 diffusion model (ImageNet-size presets, or tiny ones that train on a CPU).

Run as a single process, or with several via `torchrun --standalone --nproc_per_node=N train_edm2.py ...`.
Running the same command again resumes from the newest training state in --outdir.
"""

import inspect
import json
import math
import os
import re

import click
import torch

import dnnlib
from torch_utils import distributed as dist
from training import distill
from training import loss_cd
from training import networks_edm2
from training import training_loop

#----------------------------------------------------------------------------
# Presets set hyperparameters only: the network's resolution and channels always come from the data
# (the img512 presets are meant for 64x64x8 VAE latents of 512x512 images, the img64 ones for
# pixels, but any resolution the U-Net can halve often enough works).

def _edm2_presets(family, P_mean, P_std, decay, sizes):
    return {f'edm2-{family}-{size}': dnnlib.EasyDict(duration=duration_Mi << 20, batch=2048, channels=channels,
                lr=lr, decay=decay, dropout=dropout, P_mean=P_mean, P_std=P_std)
            for size, (duration_Mi, channels, lr, dropout) in sizes.items()}

# size: (duration in Mi images, model channels, reference learning rate, dropout)
PRESETS = {
    **_edm2_presets('img512', P_mean=-0.4, P_std=1.0, decay=70000, sizes=dict(
        xxs=(2048, 64, 0.0170, 0.00), xs=(2048, 128, 0.0120, 0.00), s=(2048, 192, 0.0100, 0.00),
        m=(2048, 256, 0.0090, 0.10), l=(1792, 320, 0.0080, 0.10), xl=(1280, 384, 0.0070, 0.10),
        xxl=(896, 448, 0.0065, 0.10))),
    **_edm2_presets('img64', P_mean=-0.8, P_std=1.6, decay=35000, sizes=dict(
        xs=(1024, 128, 0.0120, 0.00), s=(1024, 192, 0.0100, 0.00), m=(2048, 256, 0.0090, 0.10),
        l=(1024, 320, 0.0080, 0.10), xl=(640, 384, 0.0070, 0.10))),
}

# Small models for CPU experiments and tests: 1024 optimizer steps, minutes on a few cores.
_tiny_common = dict(duration=32 << 10, batch=32, channels=32, lr=0.0100, decay=500, dropout=0.00, P_mean=-0.8,
    P_std=1.6, rampup_Mimg=0.004, status=1 << 10, snapshot=8 << 10, checkpoint=16 << 10)
PRESETS['tiny-img16'] = dnnlib.EasyDict(_tiny_common, unet_kwargs=dict(channel_mult=[1, 2], num_blocks=1))
PRESETS['tiny-img32'] = dnnlib.EasyDict(_tiny_common, unet_kwargs=dict(channel_mult=[1, 2, 2], num_blocks=1))

# Consistency distillation (--teacher). CD presets set the schedule of the distillation run; the
# student's architecture always comes from the teacher. lr = the reference rate for --cd_lr.
_cd_presets = [
    # 4-step student of a tiny-img16 teacher on a CPU.
    ('cd-tiny-img16', dict(duration=16 << 10, batch=32, lr=0.002, decay=0, rampup_Mimg=0.001,
        S=4, T_start=16, T_end=64, T_anneal_kimg=8, status=1 << 10, snapshot=4 << 10, checkpoint=8 << 10)),
    # Starting points for the EDM2 sizes people distil (half the run anneals T, CD_DEFAULTS otherwise).
    ('cd-edm2-img64-s', dict(duration=128 << 20, batch=2048, lr=0.001, decay=0, rampup_Mimg=1, T_anneal_kimg=67109)),
    ('cd-edm2-img512-s', dict(duration=128 << 20, batch=2048, lr=0.001, decay=0, rampup_Mimg=1, T_anneal_kimg=67109)),
]
PRESETS.update({name: dnnlib.EasyDict(values) for name, values in _cd_presets})

# Defaults of the CD options where neither the command line nor a CD preset sets them
# (the EDM MSCD reference's values; docs/distillation.md, Options).
CD_DEFAULTS = dict(S=8, T_start=256, T_end=1024, T_anneal_kimg=750, rho=7.0, sigma_min=0.002, sigma_max=80.0,
    cd_loss='pseudo_huber', cd_weight_mode='sqrt_karras', sampling_mode='vp', sync_dropout=True,
    terminal_anchor=True, terminal_teacher_hop=False, cd_P_mean=-1.2, cd_P_std=1.2, cd_dropout=0.0)

# Options that only distillation reads; without --teacher they are refused rather than ignored.
CD_ONLY_OPTIONS = (*CD_DEFAULTS, 'cd_lr', 'cd_decay')

# With --teacher, EDM2's option and the MSCD port's option name the same student setting.
CD_ALIASES = dict(dropout='cd_dropout', lr='cd_lr', decay='cd_decay')

# Used where neither the command line nor the preset sets an interval.
DEFAULT_INTERVALS = dict(status=128 << 10, snapshot=8 << 20, checkpoint=128 << 20)

#----------------------------------------------------------------------------

class ImageCount(click.ParamType):
    """A number of images: an integer, optionally with a binary suffix Ki, Mi or Gi (e.g. 128Ki)."""
    name = 'NIMG'
    _shifts = {'': 0, 'Ki': 10, 'Mi': 20, 'Gi': 30}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        match = re.fullmatch(r'(\d+)(Ki|Mi|Gi)?', str(value).strip())
        if match is None:
            self.fail(f'{value!r} is not an image count; expected an integer optionally followed by Ki, Mi or Gi, '
                'e.g. 4096, 128Ki or 8Mi', param, ctx)
        return int(match.group(1)) << self._shifts[match.group(2) or '']


def parse_resolution_list(ctx, param, text):
    if text is None:
        return None
    values = [part.strip() for part in text.split(',')]
    if not all(value.isdigit() and int(value) > 0 for value in values):
        raise click.BadParameter(f'{text!r}: expected comma-separated resolutions, e.g. 16,8')
    return [int(value) for value in values]


def _open_dataset(dataset_kwargs):
    path = dataset_kwargs.path
    if not os.path.exists(path):
        raise click.BadParameter(f'{path!r} does not exist; expected a dataset ZIP or folder from dataset_tool.py',
            param_hint='--data')
    try:
        return dnnlib.util.construct_class_by_name(**dataset_kwargs)
    except Exception as err:
        raise click.BadParameter(f'cannot read {path!r} as a dataset ZIP or folder of images ({err})',
            param_hint='--data') from err


def _encoder_for(dataset, path):
    if dataset.num_channels == 3:
        return dnnlib.EasyDict(class_name='training.encoders.StandardRGBEncoder')
    if dataset.num_channels == 8:
        return dnnlib.EasyDict(class_name='training.encoders.StabilityVAEEncoder')
    raise click.BadParameter(f'{path!r} has {dataset.num_channels}-channel images; expected 3 (RGB pixels) '
        'or 8 (VAE latents from dataset_tool.py encode)', param_hint='--data')


def _require_multiple(option, value, divisor, divisor_desc):
    if value % divisor != 0:
        raise click.BadParameter(f'{value} images is not a multiple of {divisor_desc}', param_hint=option)


def _check_schedule(c, world_size):
    batch = c.batch_size
    _require_multiple('--batch', batch, world_size, f'the number of processes ({world_size})')
    per_process = batch // world_size
    batch_gpu = min(c.batch_gpu or per_process, per_process)
    _require_multiple(['--batch', '--batch-gpu'], per_process, batch_gpu,
        f'--batch-gpu ({batch_gpu}) per process ({world_size} process(es))')
    _require_multiple('--duration', c.total_nimg, batch, f'the batch size ({batch})')
    _require_multiple('--status', c.status_nimg, batch, f'the batch size ({batch})')
    for option, value in [('--snapshot', c.snapshot_nimg), ('--checkpoint', c.checkpoint_nimg)]:
        _require_multiple(option, value, math.lcm(batch, 1024), f'both 1024 and the batch size ({batch})')


def _flag(name):
    return '--batch-gpu' if name == 'batch_gpu' else f'--{name}'


def _check_options_apply(opts, given):
    """Refuse options that the chosen mode (plain training or distillation) would not use."""
    if opts.teacher is None:
        stray = [_flag(name) for name in CD_ONLY_OPTIONS if name in given]
        if stray:
            raise click.BadParameter(f'{", ".join(stray)} only apply to consistency distillation; add --teacher=PKL '
                'or leave them out', param_hint=stray[0])
        return
    if 'channels' in given:
        raise click.BadParameter("the student has the teacher's architecture, so its channel count cannot change; "
            'leave --channels out', param_hint='--channels')
    for name in ('P_mean', 'P_std'):
        if name in given:
            raise click.BadParameter(f'distillation draws noise levels with --sampling_mode, not with {_flag(name)}; '
                f'for log-normal levels use --sampling_mode=edm --cd_{name}', param_hint=_flag(name))
    for name, port_name in CD_ALIASES.items():
        if name in given and port_name in given and opts[name] != opts[port_name]:
            raise click.BadParameter(f'{_flag(name)}={opts[name]} and {_flag(port_name)}={opts[port_name]} both set the '
                "student's value; give one of them", param_hint=[_flag(name), _flag(port_name)])
    sampling_mode = opts.sampling_mode or CD_DEFAULTS['sampling_mode']
    for name in ('cd_P_mean', 'cd_P_std'):
        if name in given and sampling_mode != 'edm':
            raise click.BadParameter(f'only --sampling_mode=edm draws log-normal noise levels; with '
                f'--sampling_mode={sampling_mode} {_flag(name)} has no effect', param_hint=_flag(name))
    if 'terminal_anchor' in given and sampling_mode == 'uniform':
        raise click.BadParameter('--sampling_mode=uniform always draws the terminal edge with probability 1/S, so '
            '--terminal_anchor/--no_terminal_anchor has no effect there', param_hint='--terminal_anchor')


def _check_architecture(network_kwargs, resolution, preset, path):
    """Refuse data that the preset's U-Net cannot run at, before anything is built."""
    unet_defaults = inspect.signature(networks_edm2.UNet).parameters
    channel_mult = network_kwargs.get('channel_mult', unet_defaults['channel_mult'].default)
    problem = networks_edm2.unet_resolution_problem(resolution, channel_mult)
    if problem is not None:
        raise click.BadParameter(f'{path!r} holds {resolution}x{resolution} images, which preset {preset!r} cannot '
            f'train on: {problem}', param_hint='--data')
    dout_resolutions = network_kwargs.get('dout_resolutions')
    if dout_resolutions is not None:
        levels = [resolution >> level for level in range(len(channel_mult))]
        unknown = [res for res in dout_resolutions if res not in levels]
        if unknown:
            raise click.BadParameter(f'{unknown} are not resolutions of this network; its levels run at {levels}',
                param_hint='--dout_resolutions')
        if not network_kwargs.get('dropout'):
            raise click.BadParameter('dropout is 0, so there is nothing to restrict to these resolutions; '
                'set --dropout too', param_hint='--dout_resolutions')


def setup_training_config(preset='edm2-img512-s', **opts):
    """Build the training_loop() keyword arguments from command-line options and a preset."""
    opts = dnnlib.EasyDict(opts)
    given = {name for name, value in opts.items() if value is not None}
    if preset not in PRESETS:
        raise click.BadParameter(f'unknown preset {preset!r}; expected one of {", ".join(PRESETS)}', param_hint='--preset')
    is_cd_preset = preset.startswith('cd-')
    if is_cd_preset and opts.get('teacher') is None:
        raise click.BadParameter(f'preset {preset!r} distils a teacher; give the teacher pickle with --teacher',
            param_hint='--preset')
    if opts.get('teacher') is not None and not is_cd_preset and opts.duration is None:
        raise click.BadParameter(f'distillation with the pre-training preset {preset!r} needs an explicit --duration '
            '(or use a cd-* preset)', param_hint='--duration')
    _check_options_apply(opts, given)
    if opts.checkpoint_keep_recent is not None and opts.checkpoint == 0:
        raise click.BadParameter('--checkpoint=0 writes no training states, so there are none to keep',
            param_hint='--checkpoint_keep_recent')
    for key, value in PRESETS[preset].items():
        if opts.get(key) is None:
            opts[key] = value
    for key, value in DEFAULT_INTERVALS.items():
        if opts.get(key) is None:
            opts[key] = value

    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=opts.data, use_labels=opts.cond)
    dataset = _open_dataset(c.dataset_kwargs)
    if opts.cond and not dataset.has_labels:
        raise click.BadParameter(f'{opts.data!r} has no labels (no dataset.json labels); '
            'train unconditionally with --cond=False', param_hint='--cond')

    c.encoder_kwargs = _encoder_for(dataset, opts.data)
    c.total_nimg = opts.duration
    c.batch_size = opts.batch
    c.network_kwargs = dnnlib.EasyDict(class_name='training.networks_edm2.Precond', model_channels=opts.channels,
        dropout=opts.dropout, use_fp16=opts.fp16, **opts.get('unet_kwargs', {}))
    if opts.dout_resolutions is not None:
        c.network_kwargs.dout_resolutions = opts.dout_resolutions
    c.loss_kwargs = dnnlib.EasyDict(class_name='training.training_loop.EDM2Loss', P_mean=opts.P_mean, P_std=opts.P_std)
    c.lr_kwargs = dnnlib.EasyDict(func_name='training.training_loop.learning_rate_schedule', ref_lr=opts.lr,
        ref_batches=opts.decay)
    if 'rampup_Mimg' in opts:
        c.lr_kwargs.rampup_Mimg = opts.rampup_Mimg
    c.batch_gpu = opts.batch_gpu or None
    c.loss_scaling = opts.ls
    c.cudnn_benchmark = opts.bench
    c.status_nimg = opts.status
    c.snapshot_nimg = opts.snapshot
    c.checkpoint_nimg = opts.checkpoint
    c.seed = opts.seed
    if opts.checkpoint_keep_recent is not None:
        c.checkpoint_keep_recent = opts.checkpoint_keep_recent
    if opts.get('teacher') is not None:
        _setup_distillation(c, opts, given, is_cd_preset, dataset)
    _check_architecture(c.network_kwargs, dataset.resolution, preset, opts.data)
    _check_schedule(c, dist.get_world_size())
    return c


def _student_value(opts, given, name, fallback):
    """A student setting that EDM2's option and the MSCD port's option (CD_ALIASES) can both give."""
    port_name = CD_ALIASES[name]
    if port_name in given:
        return opts[port_name]
    return opts[name] if name in given else fallback


def _setup_distillation(c, opts, given, is_cd_preset, dataset):
    """Turn the config into a consistency-distillation run of a student seeded from --teacher."""
    for key, value in CD_DEFAULTS.items():
        if opts.get(key) is None:
            opts[key] = value
    if opts.T_start < opts.S:
        raise click.BadParameter(f'{opts.T_start} teacher edges cannot cover {opts.S} student steps; '
            f'expected --T_start >= --S (2x recommended)', param_hint='--T_start')
    try:
        teacher, teacher_encoder = dist.node_first(distill.load_teacher_pickle, opts.teacher)
        encoder = dnnlib.util.construct_class_by_name(**c.encoder_kwargs)
        latent_shape, label_dim = training_loop.latent_shape_and_label_dim(dataset, encoder, torch.device('cpu'))
        distill.check_teacher(teacher, teacher_encoder, encoder, latent_shape, label_dim)
        c.network_kwargs = distill.teacher_network_kwargs(teacher)
    except distill.TeacherError as err:
        raise click.BadParameter(str(err), param_hint='--teacher') from err
    c.network_kwargs.update(dropout=_student_value(opts, given, 'dropout', CD_DEFAULTS['cd_dropout']), use_fp16=opts.fp16)
    if opts.dout_resolutions is not None:
        c.network_kwargs.dout_resolutions = opts.dout_resolutions
    c.loss_kwargs = dnnlib.EasyDict(class_name='training.loss_cd.EDMConsistencyDistillLoss', teacher_net=None,
        S=opts.S, T_start=opts.T_start, T_end=opts.T_end, T_anneal_kimg=opts.T_anneal_kimg, rho=opts.rho,
        sigma_min=opts.sigma_min, sigma_max=opts.sigma_max, loss_type=opts.cd_loss, weight_mode=opts.cd_weight_mode,
        sampling_mode=opts.sampling_mode, sync_dropout=opts.sync_dropout, terminal_anchor=opts.terminal_anchor,
        terminal_teacher_hop=opts.terminal_teacher_hop, P_mean=opts.cd_P_mean, P_std=opts.cd_P_std)
    if not ({'lr', 'cd_lr'} & given) and not is_cd_preset:
        dist.print0(f'Warning: no --cd_lr; distilling with the from-scratch learning rate {opts.lr} of the preset, '
            'which is aggressive for a teacher-seeded student')
    c.lr_kwargs.ref_lr = _student_value(opts, given, 'lr', opts.lr)
    c.lr_kwargs.ref_batches = _student_value(opts, given, 'decay', opts.decay)
    c.frozen_params = ['logvar_linear']   # the logvar head gets no gradient in CD, which DDP would reject
    c.ddp_kwargs = dnnlib.EasyDict(broadcast_buffers=False, gradient_as_bucket_view=True,
        find_unused_parameters=False, bucket_cap_mb=100)
    c.teacher_pkl = opts.teacher


def print_training_config(run_dir, c):
    dist.print0()
    dist.print0('Training config:')
    dist.print0(json.dumps(c, indent=2))
    dist.print0()
    device = training_loop.default_device()
    summary = [
        ('Run directory', run_dir),
        ('Dataset', c.dataset_kwargs.path),
        ('Class-conditional', c.dataset_kwargs.use_labels),
        ('Processes', f'{dist.get_world_size()} on {device.type}'),
        ('Batch size', f'{c.batch_size} images'),
        ('Duration', f'{c.total_nimg} images'),
        ('Mixed precision', c.network_kwargs.use_fp16 and device.type == 'cuda'),
    ]
    for label, value in summary:
        dist.print0(f'{label + ":":<20s}{value}')
    dist.print0()


def launch_training(run_dir, c):
    """Create (or reuse) the run directory, log to run_dir/log.txt and train; rerunning resumes."""
    if dist.get_rank() == 0:
        os.makedirs(run_dir, exist_ok=True)
        options_path = os.path.join(run_dir, 'training_options.json')
        if not os.path.isfile(options_path):
            with open(options_path, 'wt') as f:
                json.dump(c, f, indent=2)
    torch.distributed.barrier()
    if dist.get_rank() == 0:
        dnnlib.util.Logger(file_name=os.path.join(run_dir, 'log.txt'), file_mode='a', should_flush=True)
    training_loop.training_loop(run_dir=run_dir, **c)

#----------------------------------------------------------------------------

@click.command()
@click.option('--outdir', help='Run directory; rerunning with the same one resumes', metavar='DIR', type=str, required=True)
@click.option('--data', help='Dataset ZIP or folder (from dataset_tool.py)', metavar='ZIP|DIR', type=str, required=True)
@click.option('--cond', help='Condition on the dataset labels', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--preset', help=f'Configuration preset: {", ".join(PRESETS)}', metavar='STR', type=str,
    default='edm2-img512-s', show_default=True)
@click.option('--duration', help='Images to train for [default: preset]', metavar='NIMG', type=ImageCount())
@click.option('--batch', help='Images per optimizer step [default: preset]', metavar='NIMG', type=ImageCount())
@click.option('--channels', help='Base channel count of the UNet [default: preset]', metavar='INT', type=click.IntRange(min=1))
@click.option('--dropout', help='Dropout probability [default: preset]', metavar='FLOAT', type=click.FloatRange(min=0, max=1))
@click.option('--P_mean', 'P_mean', help='Mean of log(sigma) during training [default: preset]', metavar='FLOAT', type=float)
@click.option('--P_std', 'P_std', help='Std of log(sigma) during training [default: preset]', metavar='FLOAT',
    type=click.FloatRange(min=0, min_open=True))
@click.option('--lr', help='Reference learning rate [default: preset]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--decay', help='Optimizer steps before the learning rate starts to decay [default: preset]', metavar='BATCHES',
    type=click.FloatRange(min=0))
@click.option('--batch-gpu', help='Images per process per forward pass (0 = whole per-process batch)', metavar='NIMG',
    type=ImageCount(), default=0, show_default=True)
@click.option('--fp16', help='Run the network in float16 where supported (CUDA)', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--ls', help='Loss scaling factor', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1, show_default=True)
@click.option('--bench', help='Let cuDNN benchmark convolution algorithms', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--status', help='Status line interval, 0 = off [default: preset, else 128Ki]', metavar='NIMG', type=ImageCount())
@click.option('--snapshot', help='Network snapshot interval, 0 = off [default: preset, else 8Mi]', metavar='NIMG', type=ImageCount())
@click.option('--checkpoint', help='Training state interval, 0 = off [default: preset, else 128Mi]', metavar='NIMG', type=ImageCount())
@click.option('--checkpoint_keep_recent', help='Keep only the newest N training states [default: all]', metavar='N',
    type=click.IntRange(min=1))
@click.option('--seed', help='Random seed', metavar='INT', type=int, default=0, show_default=True)
@click.option('--teacher', help='Distil this EDM2 network pickle (path or URL) into a consistency student', metavar='PKL|URL', type=str)
@click.option('--S', 'S', help='CD: student sampling steps [default: 8]', metavar='INT', type=click.IntRange(min=1))
@click.option('--T_start', 'T_start', help='CD: teacher ODE edges (Heun hops) at the start [default: 256]', metavar='INT', type=click.IntRange(min=2))
@click.option('--T_end', 'T_end', help='CD: teacher ODE edges at the end of the anneal [default: 1024]', metavar='INT', type=click.IntRange(min=2))
@click.option('--T_anneal_kimg', 'T_anneal_kimg', help='CD: thousands of images over which T grows log-linearly [default: 750]',
    metavar='KIMG', type=click.FloatRange(min=0))
@click.option('--rho', help='CD: Karras grid exponent [default: 7]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma_min', help='CD: lowest noise level of the grids [default: 0.002]', metavar='FLOAT',
    type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma_max', help='CD: highest noise level of the grids [default: 80]', metavar='FLOAT',
    type=click.FloatRange(min=0, min_open=True))
@click.option('--cd_loss', help='CD: distance [default: pseudo_huber]', type=click.Choice(loss_cd.LOSS_TYPES))
@click.option('--cd_weight_mode', help='CD: per-sample weight of sigma_t [default: sqrt_karras]', type=click.Choice(list(loss_cd.LOSS_WEIGHTS)))
@click.option('--sampling_mode', help='CD: how teacher edges are drawn (vp, edm: importance weights; uniform: per segment) [default: vp]',
    type=click.Choice(loss_cd.SAMPLING_MODES))
@click.option('--cd_P_mean', 'cd_P_mean', help='CD: log-normal mean for --sampling_mode=edm [default: -1.2]', metavar='FLOAT', type=float)
@click.option('--cd_P_std', 'cd_P_std', help='CD: log-normal std for --sampling_mode=edm [default: 1.2]', metavar='FLOAT',
    type=click.FloatRange(min=0, min_open=True))
@click.option('--sync_dropout/--no_sync_dropout', help='CD: same dropout mask for prediction and target [default: on]', default=None)
@click.option('--terminal_anchor/--no_terminal_anchor', help='CD: draw the sigma_min->0 edge with probability 1/T_eff [default: on]', default=None)
@click.option('--terminal_teacher_hop/--no_terminal_teacher_hop', help='CD: terminal target is the teacher denoising at sigma_min instead of the data [default: off]', default=None)
@click.option('--cd_dropout', help='CD: student dropout [default: 0]', metavar='FLOAT', type=click.FloatRange(min=0, max=1))
@click.option('--dout_resolutions', help='Resolutions where dropout applies, e.g. 16,8 [default: all]', metavar='LIST',
    callback=parse_resolution_list)
@click.option('--cd_lr', help='CD: reference learning rate [default: CD preset, else the preset lr]', metavar='FLOAT',
    type=click.FloatRange(min=0, min_open=True))
@click.option('--cd_decay', help='CD: batches before inverse-sqrt decay, 0 = constant [default: CD preset, else preset decay]',
    metavar='BATCHES', type=click.FloatRange(min=0))
@click.option('-n', '--dry-run', help='Show the configuration and exit without training', is_flag=True)
def cmdline(outdir, dry_run, **opts):
    """Train an EDM2 model.

    \b
    Example, on one CPU or GPU:
      python train_edm2.py --outdir=runs/tiny --data=datasets/digits16.zip --cond=False --preset=tiny-img16
    Example, on 8 GPUs:
      torchrun --standalone --nproc_per_node=8 train_edm2.py --outdir=runs/img512-s \\
          --data=datasets/img512-sd.zip --preset=edm2-img512-s --batch-gpu=32
    """
    torch.multiprocessing.set_start_method('spawn')
    dist.init()
    c = setup_training_config(**opts)
    print_training_config(outdir, c)
    if dry_run:
        dist.print0('Dry run; exiting.')
        return
    launch_training(outdir, c)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    cmdline()

#----------------------------------------------------------------------------
