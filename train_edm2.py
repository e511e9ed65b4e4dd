"""Train an EDM2 diffusion model, or turn one into a few-step consistency student.

Run as a single process, or with several via `torchrun --standalone --nproc_per_node=N train_edm2.py ...`.
Running the same command again resumes from the newest training state in --outdir.
"""

import inspect
import json
import os

import click
import torch

import calculate_metrics
import dnnlib
import generate_images
from dnnlib.cli import FiniteFloat, ImageCount
from torch_utils import distributed as dist
from torch_utils import misc
from training import networks_edm2
from training import training_loop

#----------------------------------------------------------------------------
# Training methods: --method name -> the loss (training objective) that implements it. Each loss
# class lists its command-line options in OPTIONS; their defaults are those of its constructor.

METHODS = {
    'edm2': 'training.training_loop.EDM2Loss',
    'cd':   'training.loss_cd.EDMConsistencyDistillLoss',
    'ct':   'training.loss_ct.ConsistencyTrainingLoss',
    'cdm': 'training.loss_cdm.CDMLoss',
    'scd':  'training.loss_scm.SCDLoss',
    'sct':  'training.loss_scm.SCTLoss',
}

#----------------------------------------------------------------------------
# Presets set hyperparameters only: the network's resolution and channels always come from the data
# (the img512 presets are meant for 64x64x8 VAE latents of 512x512 images, the img64 ones for
# pixels, but any resolution the U-Net can halve often enough works). A preset made for a method
# other than --method=edm2 names it. The tiny presets train in minutes on a few CPU cores.

PRESETS = {
    'edm2-img512-xxs':  dict(channels=64,  dropout=0.00, lr=0.0170, decay=70000, P_mean=-0.4, P_std=1.0, duration=2048 << 20, batch=2048),
    'edm2-img512-xs':   dict(channels=128, dropout=0.00, lr=0.0120, decay=70000, P_mean=-0.4, P_std=1.0, duration=2048 << 20, batch=2048),
    'edm2-img512-s':    dict(channels=192, dropout=0.00, lr=0.0100, decay=70000, P_mean=-0.4, P_std=1.0, duration=2048 << 20, batch=2048),
    'edm2-img512-m':    dict(channels=256, dropout=0.10, lr=0.0090, decay=70000, P_mean=-0.4, P_std=1.0, duration=2048 << 20, batch=2048),
    'edm2-img512-l':    dict(channels=320, dropout=0.10, lr=0.0080, decay=70000, P_mean=-0.4, P_std=1.0, duration=1792 << 20, batch=2048),
    'edm2-img512-xl':   dict(channels=384, dropout=0.10, lr=0.0070, decay=70000, P_mean=-0.4, P_std=1.0, duration=1280 << 20, batch=2048),
    'edm2-img512-xxl':  dict(channels=448, dropout=0.10, lr=0.0065, decay=70000, P_mean=-0.4, P_std=1.0, duration=896 << 20,  batch=2048),
    'edm2-img64-xs':    dict(channels=128, dropout=0.00, lr=0.0120, decay=35000, P_mean=-0.8, P_std=1.6, duration=1024 << 20, batch=2048),
    'edm2-img64-s':     dict(channels=192, dropout=0.00, lr=0.0100, decay=35000, P_mean=-0.8, P_std=1.6, duration=1024 << 20, batch=2048),
    'edm2-img64-m':     dict(channels=256, dropout=0.10, lr=0.0090, decay=35000, P_mean=-0.8, P_std=1.6, duration=2048 << 20, batch=2048),
    'edm2-img64-l':     dict(channels=320, dropout=0.10, lr=0.0080, decay=35000, P_mean=-0.8, P_std=1.6, duration=1024 << 20, batch=2048),
    'edm2-img64-xl':    dict(channels=384, dropout=0.10, lr=0.0070, decay=35000, P_mean=-0.8, P_std=1.6, duration=640 << 20,  batch=2048),
    'tiny-img16':       dict(channels=32,  dropout=0.00, lr=0.0100, decay=500,   P_mean=-0.8, P_std=1.6, duration=32 << 10,  batch=32, rampup_Mimg=0.004, channel_mult=[1, 2], num_blocks=1, status=1 << 10, snapshot=8 << 10, checkpoint=16 << 10),
    'tiny-img32':       dict(channels=32,  dropout=0.00, lr=0.0100, decay=500,   P_mean=-0.8, P_std=1.6, duration=32 << 10,  batch=32, rampup_Mimg=0.004, channel_mult=[1, 2, 2], num_blocks=1, status=1 << 10, snapshot=8 << 10, checkpoint=16 << 10),
    'cd-tiny-img16':    dict(method='cd', S=4, T_start=16, T_end=64, T_anneal_kimg=8, student_sigma_min=0.6, lr=0.004, decay=64, teacher_solver='ddim', duration=16 << 10, batch=32, rampup_Mimg=0.001, status=1 << 10, snapshot=4 << 10, checkpoint=8 << 10),
    'scd-tiny-img16':   dict(method='scd', scm_steps=2, scm_warmup_kimg=4, lr=0.002, decay=64, duration=16 << 10, batch=32, rampup_Mimg=0.001, status=1 << 10, snapshot=4 << 10, checkpoint=8 << 10),
    'cd-edm2-img64-s':  dict(method='cd', T_anneal_kimg=67109, lr=0.001, decay=0, teacher_solver='ddim', duration=128 << 20, batch=2048, rampup_Mimg=1),
    'cd-edm2-img512-s': dict(method='cd', T_anneal_kimg=67109, lr=0.001, decay=0, teacher_solver='ddim', duration=128 << 20, batch=2048, rampup_Mimg=1),
}

# Used where neither the command line nor the preset sets an interval.
DEFAULT_INTERVALS = dict(status=128 << 10, snapshot=8 << 20, checkpoint=128 << 20)

# The MSCD port for EDM2 spells these student settings differently; both spellings work.
PORT_ALIASES = dict(cd_dropout='dropout', cd_lr='lr', cd_decay='decay')

# Validation while training: command-line option -> training.monitoring.Validator argument.
VALIDATION_OPTIONS = dict(val_ref='ref', val_metrics='metrics', val_every='every', val_num='num', val_steps='steps',
    val_seed='seed', val_batch='batch', val_at_start='at_start', val_heun='heun', val_std='std', detector='detectors')

def _val_default(argument):
    return inspect.signature(dnnlib.util.get_obj_by_name('training.monitoring.Validator')).parameters[argument].default

# Where the loop's own checks point: training_loop argument -> command-line option.
LOOP_OPTIONS = dict(batch_size='--batch', batch_gpu='--batch-gpu', total_nimg='--duration', status_nimg='--status',
    snapshot_nimg='--snapshot', checkpoint_nimg='--checkpoint')

#----------------------------------------------------------------------------
# Command-line options of the methods, gathered from their OPTIONS tables.

def _constructor_default(cls, kwarg):
    """The default of constructor argument `kwarg`, also when a subclass passes it on to a base class."""
    for klass in cls.__mro__:
        parameters = inspect.signature(klass.__init__).parameters if '__init__' in vars(klass) else {}
        if kwarg in parameters:
            return parameters[kwarg].default
    raise TypeError(f'{cls.__name__} takes no constructor argument {kwarg!r}')


def _method_options():
    """option -> EasyDict(methods, kwarg, kind, help, default) over all METHODS."""
    options = {}
    for method, class_name in METHODS.items():
        cls = dnnlib.util.get_obj_by_name(class_name)
        for name, (kwarg, kind, help) in cls.OPTIONS.items():
            spec = options.setdefault(name, dnnlib.EasyDict(methods=[], kwarg=kwarg, kind=kind, help=help,
                default=_constructor_default(cls, kwarg)))
            if (spec.kwarg, spec.kind) != (kwarg, kind):
                raise TypeError(f'methods {spec.methods} and {method} declare option --{name} differently')
            spec.methods.append(method)
    return options

METHOD_OPTIONS = _method_options()


def _click_option(name, spec):
    prefix = ', '.join(method.upper() for method in spec.methods)
    default = '' if spec.default is None else f' [default: {"on" if spec.default is True else "off" if spec.default is False else spec.default}]'
    help = f'{prefix}: {spec.help}{default if "[default" not in spec.help else ""}'
    if spec.kind is bool:
        return click.option(f'--{name}/--no_{name}', name, help=help, default=None)
    if isinstance(spec.kind, tuple):
        return click.option(f'--{name}', name, help=help, type=click.Choice(spec.kind))
    types = {int: (click.INT, 'INT'), float: (FiniteFloat(), 'FLOAT'), 'PKL': (str, 'PKL|URL')}
    return click.option(f'--{name}', name, help=help, type=types[spec.kind][0], metavar=types[spec.kind][1])


def method_options(command):
    for name, spec in reversed(METHOD_OPTIONS.items()):
        command = _click_option(name, spec)(command)
    return command

#----------------------------------------------------------------------------

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
        dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
        dataset[0]  # the network's shape comes from the first sample
        return dataset
    except dnnlib.UserError as err:
        raise click.BadParameter(str(err), param_hint='--data') from None


def _encoder_for(dataset, path):
    if dataset.num_channels == 3:
        return dnnlib.EasyDict(class_name='training.encoders.StandardRGBEncoder')
    if dataset.num_channels == 8:
        return dnnlib.EasyDict(class_name='training.encoders.StabilityVAEEncoder')
    raise click.BadParameter(f'{path!r} has {dataset.num_channels}-channel images; expected 3 (RGB pixels) '
        'or 8 (VAE latents from dataset_tool.py encode)', param_hint='--data')


def _flag(name):
    return '--batch-gpu' if name == 'batch_gpu' else f'--{name}'


class _OptionErrors:
    """Turns a UserError whose `option` names a constructor or loop argument into an error on the
    command-line option behind it."""

    def __init__(self, kwarg_options):
        self.kwarg_options = kwarg_options

    def __enter__(self):
        return self

    def __exit__(self, exc_type, err, traceback):
        if isinstance(err, dnnlib.UserError):
            flag = self.kwarg_options.get(err.option)
            message = str(err).removeprefix(f'{flag}: ') if flag else str(err)
            raise click.BadParameter(message, param_hint=flag) from None


def _choose_method(opts, given, preset):
    method = opts.method or PRESETS[preset].get('method') or ('cd' if 'teacher' in given else 'edm2')
    preset_method = PRESETS[preset].get('method', 'edm2')
    if method != preset_method and 'duration' not in given:
        raise click.BadParameter(f'preset {preset!r} is made for --method={preset_method}; with --method={method} '
            f'give --duration explicitly (or a preset made for {method})', param_hint='--duration')
    for name in given & METHOD_OPTIONS.keys():
        spec = METHOD_OPTIONS[name]
        if method not in spec.methods:
            siblings = [f'--{other}' for other, s in METHOD_OPTIONS.items() if method in s.methods and s.kwarg == spec.kwarg]
            hint = f' (--method={method} has {", ".join(siblings)})' if siblings else \
                ' (--teacher=PKL chooses --method=cd)' if 'cd' in spec.methods and 'method' not in PRESETS[preset] else ''
            raise click.BadParameter(f'{_flag(name)} is an option of --method={"|".join(spec.methods)}, but this run '
                f'trains with --method={method}{hint}', param_hint=_flag(name))
    return method


def _apply_teacher_preset(opts, given):
    """--teacher_preset=NAME: the --teacher, --guide and --guidance of a published EDM2 configuration
    (generate_images.py --preset); options given as well must agree with it."""
    name = opts.get('teacher_preset')
    if name is None:
        return
    chosen = generate_images.config_presets[name]
    implied = dict(teacher=chosen.net, guide=chosen.get('gnet'), guidance=chosen.get('guidance', 1.0))
    for option, value in implied.items():
        if option in given and opts[option] != value:
            raise click.BadParameter(f'--teacher_preset={name} sets --{option}={"none" if value is None else value}, '
                f'but --{option}={opts[option]} is given too; leave out --{option} or the preset',
                param_hint=f'--{option}')
    for option, value in implied.items():
        if value is not None:
            opts[option] = value
            given.add(option)


def _resolve_aliases(opts, given):
    for port_name, name in PORT_ALIASES.items():
        if port_name in given:
            if name in given and opts[name] != opts[port_name]:
                raise click.BadParameter(f'{_flag(name)}={opts[name]} and {_flag(port_name)}={opts[port_name]} set the '
                    'same value; give one of them', param_hint=[_flag(name), _flag(port_name)])
            opts[name] = opts[port_name]
            given.add(name)


def _check_architecture(network_kwargs, resolution, preset, path):
    """Refuse data that the U-Net cannot run at, before anything is built."""
    # Unwrapped: not every Python follows a persistent class's __wrapped__ to the U-Net's own signature (3.12.3 does not).
    unet_defaults = inspect.signature(inspect.unwrap(networks_edm2.UNet)).parameters
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


def _network_kwargs(opts, given, loss, method):
    """The architecture: the method's own (e.g. its teacher's) or the preset's, with the user's options."""
    architecture = loss.architecture() if hasattr(loss, 'architecture') else None
    if architecture is None:
        network = dnnlib.EasyDict(class_name='training.networks_edm2.Precond', model_channels=opts.channels,
            dropout=opts.dropout, use_fp16=opts.fp16)
        network.update({key: opts[key] for key in ('channel_mult', 'num_blocks') if opts.get(key) is not None})
    else:
        if 'channels' in given:
            raise click.BadParameter(f'--method={method} trains a network with the architecture of its pretrained '
                'network, so --channels cannot change it', param_hint='--channels')
        network = dnnlib.EasyDict(architecture, use_fp16=opts.fp16, dropout=opts.dropout if 'dropout' in given else 0.0)
    if opts.dout_resolutions is not None:
        network.dout_resolutions = opts.dout_resolutions
    return network


def _validation_kwargs(opts, given):
    """validation_kwargs for the loop when --val_ref is given; the Validator's signature holds the defaults."""
    stray = [f'--{name}' for name in VALIDATION_OPTIONS if name in given and name != 'val_ref']
    if 'val_ref' not in given:
        if stray:
            raise click.BadParameter(f'{", ".join(stray)} configure validation, which needs reference statistics: '
                'add --val_ref=PKL (from calculate_metrics.py ref)', param_hint=stray[0])
        return {}
    validation = dnnlib.EasyDict(class_name='training.monitoring.Validator',
        **{argument: opts[name] for name, argument in VALIDATION_OPTIONS.items() if name in given})
    with _OptionErrors({argument: f'--{name}' for name, argument in VALIDATION_OPTIONS.items()}):
        dnnlib.util.construct_class_by_name(**validation, run_dir='.')  # checks the reference and the values
    return dict(validation_kwargs=validation)


def _wandb_kwargs(opts, given):
    """wandb_kwargs for the loop when --wandb is given; WandbLogger's signature holds the defaults."""
    arguments = dict(wandb_project='project', wandb_entity='entity', wandb_run='name', wandb_tags='tags',
        wandb_mode='mode')
    if not opts.get('wandb'):
        stray = [f'--{name}' for name in arguments if name in given]
        if stray:
            raise click.BadParameter(f'{", ".join(stray)}: Weights & Biases logging is off; add --wandb to turn it on',
                param_hint=stray[0])
        return {}
    from training import wandb_logging  # pylint: disable=import-outside-toplevel
    wandb_logging.import_wandb()  # a missing package stops the run now, not after loading the data
    return dict(wandb_kwargs=dnnlib.EasyDict(class_name='training.wandb_logging.WandbLogger',
        **{argument: opts[name] for name, argument in arguments.items() if name in given}))


def setup_training_config(preset='edm2-img512-s', method=None, **opts):
    """Build the training_loop() keyword arguments from command-line options and a preset."""
    opts = dnnlib.EasyDict(opts, method=method)
    given = {name for name, value in opts.items() if value is not None}
    if preset not in PRESETS:
        raise click.BadParameter(f'unknown preset {preset!r}; expected one of {", ".join(PRESETS)}', param_hint='--preset')
    _apply_teacher_preset(opts, given)
    _resolve_aliases(opts, given)
    method = _choose_method(opts, given, preset)
    if opts.checkpoint_keep_recent is not None and opts.checkpoint == 0:
        raise click.BadParameter('--checkpoint=0 writes no training states, so there are none to keep',
            param_hint='--checkpoint_keep_recent')
    for key, value in {**DEFAULT_INTERVALS, **PRESETS[preset]}.items():
        if opts.get(key) is None and (key not in METHOD_OPTIONS or method in METHOD_OPTIONS[key].methods):
            opts[key] = value
    if 'student_sigma_min' in given and opts.get('S') == 1:
        raise click.BadParameter('with --S=1 the student samples in one step from sigma_max, so it has no last node '
            'to move; leave out --student_sigma_min', param_hint='--student_sigma_min')

    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=opts.data, use_labels=opts.cond)
    dataset = _open_dataset(c.dataset_kwargs)
    if opts.cond and not dataset.has_labels:
        raise click.BadParameter(f'{opts.data!r} has no labels (no dataset.json labels); '
            'train unconditionally with --cond=False', param_hint='--cond')
    c.encoder_kwargs = _encoder_for(dataset, opts.data)

    c.total_nimg = opts.duration
    c.batch_size = opts.batch

    # The method: its loss object checks its own settings (and its pretrained networks against the data).
    options = {name: spec for name, spec in METHOD_OPTIONS.items() if method in spec.methods}
    loss_kwargs = dnnlib.EasyDict(class_name=METHODS[method],
        **{spec.kwarg: opts[name] for name, spec in options.items() if opts.get(name) is not None})
    with _OptionErrors({spec.kwarg: _flag(name) for name, spec in options.items()}):
        loss = dnnlib.util.construct_class_by_name(**loss_kwargs)
        if hasattr(loss, 'prepare'):
            encoder = dnnlib.util.construct_class_by_name(**c.encoder_kwargs)
            latent_shape, label_dim = training_loop.latent_shape_and_label_dim(dataset, encoder, torch.device('cpu'))
            loss.prepare(encoder=encoder, latent_shape=latent_shape, label_dim=label_dim, device=torch.device('cpu'))
        loss_kwargs.update(loss.pinned_kwargs() if hasattr(loss, 'pinned_kwargs') else {})
        c.network_kwargs = _network_kwargs(opts, given, loss, method)
    c.loss_kwargs = loss_kwargs
    if hasattr(loss, 'architecture') and 'lr' not in given and 'method' not in PRESETS[preset]:
        dist.print0(f'Warning: no --lr; fine-tuning a pretrained network with the from-scratch learning rate '
            f'{opts.lr} of preset {preset!r}, which is aggressive')
    c.lr_kwargs = dnnlib.EasyDict(func_name='training.training_loop.learning_rate_schedule', ref_lr=opts.lr,
        ref_batches=opts.decay)
    if opts.get('rampup_Mimg') is not None:
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
    if opts.max_nonfinite_steps is not None:
        c.max_nonfinite_steps = opts.max_nonfinite_steps

    c.update(_validation_kwargs(opts, given))
    c.update(_wandb_kwargs(opts, given))
    _check_architecture(c.network_kwargs, dataset.resolution, preset, opts.data)
    with _OptionErrors(LOOP_OPTIONS):
        training_loop.split_batch(c.batch_size, c.batch_gpu, dist.get_world_size())
        training_loop.check_intervals(c.batch_size, c.total_nimg, None, c.status_nimg, c.snapshot_nimg, c.checkpoint_nimg)
    return c


def print_training_config(run_dir, c):
    dist.print0()
    dist.print0('Training config:')
    dist.print0(json.dumps(c, indent=2))
    dist.print0()
    device = misc.default_device()
    summary = [
        ('Run directory', run_dir),
        ('Dataset', c.dataset_kwargs.path),
        ('Class-conditional', c.dataset_kwargs.use_labels),
        ('Method', c.loss_kwargs.class_name),
        ('Processes', f'{dist.get_world_size()} on {device.type}'),
        ('Batch size', f'{c.batch_size} images'),
        ('Duration', f'{c.total_nimg} images'),
        ('Mixed precision', c.network_kwargs.use_fp16 and device.type == 'cuda'),
    ]
    for label, value in summary:
        dist.print0(f'{label + ":":<20s}{value}')
    dist.print0()


def launch_training(run_dir, c):
    """Create (or reuse) and lock the run directory, log to run_dir/log.txt and train; rerunning resumes."""
    lock = None
    if dist.get_rank() == 0:
        os.makedirs(run_dir, exist_ok=True)
        lock = dist.RunDirectoryLock(run_dir)  # held until this process ends
    dist.barrier()
    if dist.get_rank() == 0:
        dnnlib.util.Logger(file_name=os.path.join(run_dir, 'log.txt'), file_mode='a', should_flush=True)
    training_loop.training_loop(run_dir=run_dir, **c)
    del lock

#----------------------------------------------------------------------------

@click.command()
@click.option('--outdir', help='Run directory; rerunning with the same one resumes', metavar='DIR', type=str, required=True)
@click.option('--data', help='Dataset ZIP or folder (from dataset_tool.py)', metavar='ZIP|DIR', type=str, required=True)
@click.option('--cond', help='Condition on the dataset labels', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--preset', help=f'Configuration preset: {", ".join(PRESETS)}', metavar='STR', type=str,
    default='edm2-img512-s', show_default=True)
@click.option('--method', help='Training method [default: the preset\'s, else cd with --teacher, else edm2]',
    type=click.Choice(list(METHODS)))
@click.option('--duration', help='Images to train for [default: preset]', metavar='NIMG', type=ImageCount(min=1))
@click.option('--batch', help='Images per optimizer step [default: preset]', metavar='NIMG', type=ImageCount(min=1))
@click.option('--channels', help='Base channel count of the UNet [default: preset]', metavar='INT', type=click.IntRange(min=1))
@click.option('--dropout', help='Dropout probability [default: preset; 0 for a network seeded from a pretrained one]',
    metavar='FLOAT', type=FiniteFloat(min=0, max=1))
@click.option('--lr', help='Reference learning rate [default: preset]', metavar='FLOAT', type=FiniteFloat(min=0, min_open=True))
@click.option('--decay', help='Optimizer steps before the learning rate starts to decay, 0 = never [default: preset]',
    metavar='BATCHES', type=FiniteFloat(min=0))
@click.option('--batch-gpu', help='Images per process per forward pass (0 = whole per-process batch)', metavar='NIMG',
    type=ImageCount(), default=0, show_default=True)
@click.option('--fp16', help='Run the network in float16 where supported (CUDA)', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--ls', help='Loss scaling factor', metavar='FLOAT', type=FiniteFloat(min=0, min_open=True), default=1, show_default=True)
@click.option('--bench', help='Let cuDNN benchmark convolution algorithms', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--status', help='Status line interval, 0 = off [default: preset, else 128Ki]', metavar='NIMG', type=ImageCount())
@click.option('--snapshot', help='Network snapshot interval, 0 = off [default: preset, else 8Mi]', metavar='NIMG', type=ImageCount())
@click.option('--checkpoint', help='Training state interval, 0 = off [default: preset, else 128Mi]', metavar='NIMG', type=ImageCount())
@click.option('--checkpoint_keep_recent', help='Keep only the newest N training states [default: all]', metavar='N',
    type=click.IntRange(min=1))
@click.option('--max_nonfinite_steps', help='Stop after this many steps in a row with NaN/Inf losses or gradients, '
    '0 = never [default: 8]', metavar='N', type=click.IntRange(min=0))
@click.option('--seed', help='Random seed', metavar='INT', type=int, default=0, show_default=True)
@click.option('--dout_resolutions', help='Resolutions where dropout applies, e.g. 16,8 [default: all]', metavar='LIST',
    callback=parse_resolution_list)
@click.option('--val_ref', help='Validate snapshots against these reference statistics (calculate_metrics.py ref)',
    metavar='PKL|NPZ|URL')
@click.option('--val_metrics', help='Validation metrics [default: those in --val_ref]', metavar='LIST',
    callback=lambda ctx, param, text: None if text is None else [name.strip() for name in text.split(',') if name.strip()])
@click.option('--val_every', help=f'Validate every N-th network snapshot [default: {_val_default("every")}]', metavar='N', type=click.IntRange(min=1))
@click.option('--val_num', help=f'Images per validation [default: {_val_default("num")}]', metavar='INT', type=click.IntRange(min=2))
@click.option('--val_steps', help='Sampler steps [default: S for students, 32 Heun steps otherwise]', metavar='INT',
    type=click.IntRange(min=1))
@click.option('--val_seed', help=f'First seed of the validation images [default: {_val_default("seed")}]', metavar='INT', type=int)
@click.option('--val_batch', help=f'Largest validation batch per process [default: {_val_default("batch")}]', metavar='INT', type=click.IntRange(min=1))
@click.option('--val_at_start/--no_val_at_start', help='Also validate the first snapshot of a fresh run [default: off]',
    default=None)
@click.option('--val_heun/--no_val_heun', help='Also measure the teacher with Heun once, as a baseline [default: on]',
    default=None)
@click.option('--val_std', help='EMA profile to validate [default: the last one, e.g. 0.100]', metavar='FLOAT',
    type=FiniteFloat(min=0, min_open=True))
@click.option('--detector', help='Local file or URL of a metric\'s detector, e.g. fid=inception-2015-12-05.pkl, or fd_<name>=PKL for your own feature network (repeatable)',
    metavar='METRIC=PATH', multiple=True, callback=lambda ctx, param, values: (
        calculate_metrics.parse_detector_sources(ctx, param, values) or None))
@click.option('--wandb', help='Log statistics, validation results and samples to Weights & Biases (needs wandb)',
    is_flag=True, default=None)
@click.option('--wandb_project', metavar='STR', type=str, help='W&B project [default: '
    f'{_constructor_default(dnnlib.util.get_obj_by_name("training.wandb_logging.WandbLogger"), "project")}]')
@click.option('--wandb_entity', help='W&B entity, a user or team [default: your default entity]', metavar='STR', type=str)
@click.option('--wandb_run', help='W&B run name [default: the name of --outdir]', metavar='STR', type=str)
@click.option('--wandb_tags', help='W&B tags, comma-separated', metavar='LIST',
    callback=lambda ctx, param, text: None if text is None else [tag.strip() for tag in text.split(',') if tag.strip()])
@click.option('--wandb_mode', help='W&B mode; offline runs upload later with wandb sync [default: $WANDB_MODE, else online]',
    type=click.Choice(['online', 'offline', 'disabled']))
@click.option('--teacher_preset', '--teacher-preset', 'teacher_preset', metavar='NAME',
    type=click.Choice(sorted(generate_images.config_presets)),
    help='CD: distil a published EDM2 model of generate_images.py --preset, guided as there: sets --teacher, --guide '
    'and --guidance (e.g. edm2-img512-s-autog-fid)')
@method_options
@click.option('--cd_dropout', help='Same as --dropout (the name of the MSCD port for EDM2)', metavar='FLOAT',
    type=FiniteFloat(min=0, max=1))
@click.option('--cd_lr', help='Same as --lr (the name of the MSCD port for EDM2)', metavar='FLOAT',
    type=FiniteFloat(min=0, min_open=True))
@click.option('--cd_decay', help='Same as --decay (the name of the MSCD port for EDM2)', metavar='BATCHES',
    type=FiniteFloat(min=0))
@click.option('-n', '--dry-run', help='Show the configuration and exit without training', is_flag=True)
def cmdline(outdir, dry_run, **opts):
    """Train an EDM2 model, or distil one into a few-step student.

    \b
    Example, on one CPU or GPU:
      python train_edm2.py --outdir=runs/tiny --data=datasets/digits16.zip --cond=False --preset=tiny-img16
    Example, on 8 GPUs:
      torchrun --standalone --nproc_per_node=8 train_edm2.py --outdir=runs/img512-s \\
          --data=datasets/img512-sd.zip --preset=edm2-img512-s --batch-gpu=32
    Example, a 4-step student of the first model:
      python train_edm2.py --outdir=runs/student --data=datasets/digits16.zip --cond=False --preset=cd-tiny-img16 \\
          --teacher=runs/tiny/network-snapshot-0000032-0.100.pkl
    """
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.BadParameter(f'{outdir!r} is a file; expected a run directory (new or to resume)', param_hint='--outdir')
    torch.multiprocessing.set_start_method('spawn')
    dist.init()
    with dnnlib.cli.user_errors():
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
