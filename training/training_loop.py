"""EDM2 training: the denoising loss, the learning-rate schedule and the main training loop.

The loop trains any method: it builds the method's loss object from `loss_kwargs` and talks to it
only through this interface (docs/methods.md); every hook but __call__ is optional.

    loss_fn(net, images, labels) -> loss per sample or per element; the loop sums it
    loss_fn.prepare(encoder, latent_shape, label_dim, device)
                                  load frozen networks the method needs and check them against the data
    loss_fn.init_network(net)     initialise the freshly built network (copy weights, freeze parameters)
    loss_fn.set_progress(cur_nimg)  called before each optimizer step with the images seen so far
    loss_fn.snapshot_entries()    entries of network snapshots besides the network (default: loss_fn)
    loss_fn.state_dict(), loss_fn.load_state_dict(state)
                                  what training states keep of the method; loading refuses other settings

The embedded source of this module travels in network pickles (EDM2Loss), so it imports only what
EDM2's own code base provides.
"""

import copy
import json
import os
import pickle
import time

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence
from torch_utils import training_stats

#----------------------------------------------------------------------------
# Loss of EDM2 (Karras et al. 2024, Eq. 21): log-normal noise levels and a learned
# per-sigma uncertainty u(sigma) that balances the loss across noise levels.

@persistence.persistent_class
class EDM2Loss:
    # Command-line options of --method=edm2: option -> (constructor argument, type, help).
    OPTIONS = {
        'P_mean': ('P_mean', float, 'Mean of log(sigma) during training'),
        'P_std':  ('P_std', float, 'Std of log(sigma) during training'),
    }

    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
        if not P_std > 0:
            raise dnnlib.UserError(f'EDM2 training: P_std must be positive, got {P_std}', option='P_std')
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def state_dict(self):
        return dict(self.__dict__)  # EDM2's training states store the loss's attributes

    def load_state_dict(self, state):
        """Check that a training state was made with these settings; the settings stay as constructed."""
        differing = [f'{name}: training state {state.get(name)!r}, now {getattr(self, name)!r}'
            for name in ('P_mean', 'P_std', 'sigma_data') if state.get(name) != getattr(self, name)]
        if differing:
            raise dnnlib.UserError('The training state was made with other EDM2Loss settings: ' + '; '.join(differing))

    def __call__(self, net, images, labels=None):
        ln_sigma = self.P_mean + self.P_std * torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        sigma = ln_sigma.exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        noise = torch.randn_like(images) * sigma
        denoised, logvar = net(images + noise, sigma, labels, return_logvar=True)
        return weight / logvar.exp() * (denoised - images) ** 2 + logvar

#----------------------------------------------------------------------------
# Learning rate: linear warm-up over `rampup_Mimg`, then inverse square root decay once
# training passes `ref_batches` optimizer steps.

def learning_rate_schedule(cur_nimg, batch_size, ref_lr=100e-4, ref_batches=70e3, rampup_Mimg=10):
    decay = max(cur_nimg / (ref_batches * batch_size), 1) ** -0.5 if ref_batches > 0 else 1
    warmup = min(cur_nimg / (rampup_Mimg * 1e6), 1) if rampup_Mimg > 0 else 1
    return ref_lr * decay * warmup

#----------------------------------------------------------------------------

def default_data_loader_kwargs(device):
    if device.type == 'cuda':
        return dict(class_name='torch.utils.data.DataLoader', pin_memory=True, num_workers=2, prefetch_factor=2)
    # On CPU, loader worker processes would compete with training for the same cores.
    return dict(class_name='torch.utils.data.DataLoader', pin_memory=False, num_workers=0)


def split_batch(batch_size, batch_gpu, world_size):
    """Return (per-process batch per round, accumulation rounds) for a global `batch_size`.

    Raises UserError naming the argument (batch_size or batch_gpu) that does not divide evenly.
    """
    if batch_size < 1 or batch_size % world_size != 0:
        raise dnnlib.UserError(f'{batch_size} images per step do not split evenly over {world_size} process(es)',
            option='batch_size')
    per_process = batch_size // world_size
    batch_gpu = per_process if batch_gpu is None else min(batch_gpu, per_process)
    if batch_gpu < 1 or per_process % batch_gpu != 0:
        raise dnnlib.UserError(f'{per_process} images per process and step are not a multiple of {batch_gpu} images '
            'per forward pass', option='batch_gpu')
    return batch_gpu, per_process // batch_gpu


def check_intervals(batch_size, total_nimg, slice_nimg, status_nimg, snapshot_nimg, checkpoint_nimg):
    """Every interval must fall on optimizer-step boundaries; snapshots also on multiples of 1024 images.

    Raises UserError naming the argument at fault.
    """
    if total_nimg < 1:
        raise dnnlib.UserError(f'a run of {total_nimg} images trains nothing', option='total_nimg')
    for name, value in dict(total_nimg=total_nimg, slice_nimg=slice_nimg, status_nimg=status_nimg).items():
        if value and value % batch_size != 0:
            raise dnnlib.UserError(f'{value} images is not a multiple of the batch size ({batch_size})', option=name)
    for name, value in dict(snapshot_nimg=snapshot_nimg, checkpoint_nimg=checkpoint_nimg).items():
        if value and (value % batch_size != 0 or value % 1024 != 0):
            raise dnnlib.UserError(f'{value} images is not a multiple of both 1024 and the batch size ({batch_size})',
                option=name)


@torch.no_grad()
def sanitize_gradients(params, force_finite=True):
    """Return (global gradient norm, number of NaN/Inf gradient elements), both measured before
    the non-finite elements are zeroed (only when `force_finite`). With gradients, both are 0-dim
    tensors on their device, so the training step never waits for the device here."""
    grads = [param.grad for param in params if param.grad is not None]
    if not grads:
        return 0.0, 0
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))
    num_bad = torch.stack([(~torch.isfinite(g)).sum() for g in grads]).sum()
    if force_finite:
        for g in grads:
            torch.nan_to_num(g, nan=0, posinf=0, neginf=0, out=g)  # the identity on finite gradients
    return norm, num_bad

#----------------------------------------------------------------------------
# Status reporting.

def _format_stat(name, value):
    if not np.isfinite(value):
        return 'NaN'
    return f'{value:.3f}' if name == 'Progress/kimg' else f'{value:g}'


def _append_stats_jsonl(run_dir, collector):
    fields = [f'"{name}": {_format_stat(name, stat.mean)}' for name, stat in collector.as_dict().items()]
    fields.append(f'"timestamp": {time.time():.3f}')
    with open(os.path.join(run_dir, 'stats.jsonl'), 'at') as f:
        f.write('{' + ', '.join(fields) + '}\n')


def _report_status(run_dir, cur_nimg, total_sec, tick_sec, tick_nimg, maintenance_sec, device):
    process = psutil.Process(os.getpid())
    cpu_bytes = process.memory_info().rss + sum(child.memory_info().rss for child in process.children())
    gpu_bytes = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else 0
    reserved_bytes = torch.cuda.max_memory_reserved(device) if device.type == 'cuda' else 0
    fields = [
        ('kimg',        '<9.1f',  training_stats.report0('Progress/kimg', cur_nimg / 1e3)),
        ('time',        '<12s',   dnnlib.util.format_time(training_stats.report0('Timing/total_sec', total_sec))),
        ('sec/tick',    '<8.2f',  training_stats.report0('Timing/sec_per_tick', tick_sec)),
        ('sec/kimg',    '<7.3f',  training_stats.report0('Timing/sec_per_kimg', tick_sec / (tick_nimg / 1e3) if tick_nimg else float('nan'))),
        ('maintenance', '<7.2f',  training_stats.report0('Timing/maintenance_sec', maintenance_sec)),
        ('cpumem',      '<6.2f',  training_stats.report0('Resources/cpu_mem_gb', cpu_bytes / 2**30)),
        ('gpumem',      '<6.2f',  training_stats.report0('Resources/peak_gpu_mem_gb', gpu_bytes / 2**30)),
        ('reserved',    '<6.2f',  training_stats.report0('Resources/peak_gpu_mem_reserved_gb', reserved_bytes / 2**30)),
    ]
    dist.print0('Status: ' + ' '.join(f'{label} {value:{spec}}' for label, spec, value in fields))
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    training_stats.default_collector.update()
    bad_steps = training_stats.default_collector.as_dict().get('Loss/nonfinite_step')
    if bad_steps is not None and bad_steps.num and bad_steps.mean > 0:
        dist.print0(f'Warning: {round(bad_steps.mean * bad_steps.num)} of the last {bad_steps.num} steps had NaN/Inf '
            'losses or gradients, which were replaced by zeros')
    if dist.get_rank() == 0:
        _append_stats_jsonl(run_dir, training_stats.default_collector)

#----------------------------------------------------------------------------
# Non-finite steps: EDM2 zeroes NaN/Inf gradients and goes on; here each such step is counted on
# the device (no host sync per step) and a run that keeps producing them is stopped.

class TrainingDiverged(dnnlib.UserError):
    """Training produced non-finite values that it cannot recover from."""


class NonFiniteSteps:
    """Longest run of consecutive optimizer steps whose loss or gradients held NaN/Inf."""

    def __init__(self, device):
        self.current = torch.zeros([], dtype=torch.int64, device=device)
        self.longest = torch.zeros([], dtype=torch.int64, device=device)

    def update(self, bad):
        self.current = (self.current + 1) * bad
        self.longest = torch.maximum(self.longest, self.current)

    def check(self, limit, cur_nimg, last_state):
        """Raise TrainingDiverged once `limit` consecutive steps were bad (on any rank)."""
        longest = self.longest.clone()
        if dist.get_world_size() > 1:
            torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX)
        if limit and int(longest) >= limit:
            raise TrainingDiverged(f'Training stopped at {cur_nimg // 1000} kimg: {int(longest)} optimizer steps in a row '
                f'had NaN/Inf losses or gradients; lower the learning rate or check the data. {_resume_point(last_state)}')


def _resume_point(last_state):
    if last_state is None:
        return 'No training state was saved yet, so rerunning starts afresh'
    return f'Nothing was saved after {os.path.basename(last_state)}, where a rerun resumes'


def check_finite_parameters(net, cur_nimg, last_state):
    """Refuse to save weights that are no longer finite."""
    finite = torch.stack([torch.isfinite(param).all() for param in net.parameters()])
    if not bool(finite.all()):
        name = [name for (name, _), ok in zip(net.named_parameters(), finite.tolist()) if not ok][0]
        raise TrainingDiverged(f'Training stopped at {cur_nimg // 1000} kimg: the network weights became NaN/Inf '
            f'(first: {name}). {_resume_point(last_state)}')

#----------------------------------------------------------------------------
# Network snapshots: one pickle per EMA profile, with the network in float16 on the CPU.

def _save_snapshots(run_dir, cur_nimg, ema, net, encoder, dataset_kwargs, loss_fn):
    """Write the snapshots (rank 0) and return them on every rank as [(suffix, data, file name)]."""
    entries = loss_fn.snapshot_entries() if hasattr(loss_fn, 'snapshot_entries') else dict(loss_fn=loss_fn)
    snapshots = []
    for ema_net, suffix in (ema.get() if ema is not None else [(net, '')]):
        data = dnnlib.EasyDict(encoder=encoder, dataset_kwargs=dnnlib.EasyDict(dataset_kwargs), **entries)
        data.ema = copy.deepcopy(ema_net).cpu().eval().requires_grad_(False).to(torch.float16)
        file_name = f'network-snapshot-{cur_nimg // 1000:07d}{suffix}.pkl'
        if dist.get_rank() == 0:
            dist.print0(f'Saving {os.path.join(run_dir, file_name)} ... ', end='', flush=True)
            dist.write_file_atomically(os.path.join(run_dir, file_name), lambda f: pickle.dump(data, f))
            dist.print0('done')
        snapshots.append((suffix, data, file_name))
    dist.barrier()  # the files exist before any rank refers to them
    return snapshots

#----------------------------------------------------------------------------
# The run directory: the options that define a run, and resuming without repeating what was logged.

SCHEDULE_OPTIONS = ('total_nimg', 'slice_nimg', 'status_nimg', 'snapshot_nimg', 'checkpoint_nimg',
    'checkpoint_keep_recent', 'batch_gpu', 'lr_kwargs', 'loss_scaling', 'force_finite', 'max_nonfinite_steps',
    'cudnn_benchmark', 'data_loader_kwargs', 'ddp_kwargs', 'device', 'validation_kwargs', 'wandb_kwargs')  # may change


def _flatten(options, prefix=''):
    flat = {}
    for key, value in options.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[prefix + key] = value
    return flat


def record_run_options(run_dir, options):
    """Write the run's options to run_dir/training_options.json, or check them against the recorded ones.

    A resumed run may change only SCHEDULE_OPTIONS (the changes are printed and recorded); any other
    difference raises one UserError that lists them all.
    """
    path = os.path.join(run_dir, 'training_options.json')
    current = json.loads(json.dumps(options, default=str))
    changed = None
    if os.path.isfile(path):
        with open(path) as f:
            old, new = _flatten(json.load(f)), _flatten(current)
        show = lambda flat, key: repr(flat[key]) if key in flat else '<unset>'
        changed = [key for key in sorted(old.keys() | new.keys()) if show(old, key) != show(new, key)]
        defining = [key for key in changed if key.split('.')[0] not in SCHEDULE_OPTIONS]
        if defining:
            raise dnnlib.UserError(f'{run_dir} holds a run with other settings, so it cannot resume with these: '
                + '; '.join(f'{key}: run {show(old, key)}, now {show(new, key)}' for key in defining)
                + '. Use the run\'s settings to continue it, or another run directory to start a new run')
        for key in changed:
            dist.print0(f'Resuming with {key} = {show(new, key)} (was {show(old, key)})')
    dist.barrier()  # every rank compares before rank 0 rewrites the file
    if dist.get_rank() == 0 and changed != []:
        os.makedirs(run_dir, exist_ok=True)
        dist.write_file_atomically(path, lambda f: f.write(json.dumps(current, indent=2).encode()))


def _file_size(path):
    return os.path.getsize(path) if os.path.isfile(path) else 0


def _stats_row_kimg(line):
    try:
        return json.loads(line)['Progress/kimg']
    except (ValueError, KeyError, TypeError):
        return float('inf')  # a row cut short by a kill is dropped


def _rewind_logs(run_dir, state, session_log_start, resumed):
    """Drop what interrupted sessions logged after the training state this session starts from (or
    after the start, when there is none): stats.jsonl rows past it are removed, and log.txt lines past
    it move to log-discarded.txt."""
    stats_path = os.path.join(run_dir, 'stats.jsonl')
    if os.path.isfile(stats_path):
        with open(stats_path) as f:
            lines = f.readlines()
        last_kept = state.cur_nimg / 1e3 + 1e-6 if resumed else -1  # a fresh start rewrites the row at 0
        kept = [line for line in lines if _stats_row_kimg(line) <= last_kept]
        if len(kept) != len(lines):
            dist.write_file_atomically(stats_path, lambda f: f.write(''.join(kept).encode()))
    log_path = os.path.join(run_dir, 'log.txt')
    log_bytes = state.get('log_bytes') if resumed else 0
    if log_bytes is None or not log_bytes < session_log_start <= _file_size(log_path):
        return
    # The log is open for appending (dnnlib.util.Logger), so it is cut in place and this session's lines re-added.
    with open(log_path, 'rb') as f:
        content = f.read()
    with open(os.path.join(run_dir, 'log-discarded.txt'), 'ab') as f:
        f.write(f'--- Logged after {state.cur_nimg // 1000} kimg (where this run resumed) by an interrupted session, '
            'removed from log.txt when the run resumed ---\n'.encode() + content[log_bytes:session_log_start])
    os.truncate(log_path, log_bytes)
    with open(log_path, 'ab') as f:
        f.write(content[session_log_start:])

#----------------------------------------------------------------------------

def _next_batches(batches, rounds):
    """All of a step's batches, read before any forward pass: a bad sample stops the run between steps."""
    return [next(batches) for _ in range(rounds)]


def _training_step(ddp, net, loss_fn, encoder, optimizer, step_batches, cur_nimg, device, opts):
    """One optimizer step over `opts.batch_size` images, accumulated over `opts.rounds` forward passes.
    Returns a 0-dim bool tensor: whether the loss or a gradient held NaN/Inf."""
    lr = dnnlib.util.call_func_by_name(cur_nimg=cur_nimg, batch_size=opts.batch_size, **opts.lr_kwargs)
    misc.set_random_seed(opts.seed, dist.get_rank(), cur_nimg)
    optimizer.zero_grad(set_to_none=True)
    if hasattr(loss_fn, 'set_progress'):
        loss_fn.set_progress(cur_nimg)
    finite_loss = torch.ones([], dtype=torch.bool, device=device)
    for round_idx, (images, labels) in enumerate(step_batches):
        with misc.ddp_sync(ddp, sync=(round_idx == opts.rounds - 1)):
            loss = loss_fn(net=ddp, images=encoder.encode_latents(images.to(device)), labels=labels.to(device))
            training_stats.report('Loss/loss', loss)
            finite_loss &= torch.isfinite(loss).all()
            (loss.sum() * (opts.loss_scaling / opts.batch_gpu_total)).backward()

    training_stats.report('Loss/learning_rate', lr)
    grad_norm, num_bad = sanitize_gradients(net.parameters(), opts.force_finite)
    training_stats.report('Loss/grad_norm', grad_norm)
    training_stats.report('Loss/nan_inf_grad_count', num_bad)
    bad = ~finite_loss | (torch.as_tensor(num_bad, device=device) > 0)
    training_stats.report('Loss/nonfinite_step', bad.float())
    for group in optimizer.param_groups:
        group['lr'] = lr
    optimizer.step()
    return bad

#----------------------------------------------------------------------------

def _configure_torch_backends(cudnn_benchmark):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = cudnn_benchmark


def latent_shape_and_label_dim(dataset, encoder, device):
    """Shape of one encoded sample as the network sees it ([1, C, H, W]) and the label length."""
    image, label = dataset[0]
    latent = encoder.encode_latents(torch.as_tensor(image).to(device).unsqueeze(0))
    return latent.shape, label.shape[-1]


def _build_network(latent_shape, label_dim, network_kwargs, device, loss_fn):
    net = dnnlib.util.construct_class_by_name(**network_kwargs,
        img_resolution=latent_shape[-1], img_channels=latent_shape[1], label_dim=label_dim)
    net.train().requires_grad_(True).to(device)
    if hasattr(loss_fn, 'init_network'):
        loss_fn.init_network(net)
    return net


def _print_network_summary(net, batch_gpu, device):
    if dist.get_rank() == 0:
        image_shape = [net.img_channels, net.img_resolution, net.img_resolution]
        example_inputs = [torch.zeros([batch_gpu, *image_shape], device=device), torch.ones([batch_gpu], device=device),
            torch.zeros([batch_gpu, net.label_dim], device=device)]
        with torch.no_grad():
            misc.print_module_summary(net, example_inputs, max_nesting=2)


def _wrap_ddp(net, device, ddp_kwargs):
    if dist.get_world_size() == 1:
        return net
    device_ids = [device] if device.type == 'cuda' else None
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=device_ids, **ddp_kwargs)


def _stop_point(start_nimg, total_nimg, slice_nimg, granularity):
    if slice_nimg is None:
        return total_nimg
    return min(total_nimg, (start_nimg + slice_nimg) // granularity * granularity)


def training_loop(
    dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=None),
    encoder_kwargs=dict(class_name='training.encoders.StabilityVAEEncoder'),
    data_loader_kwargs=None,
    network_kwargs=dict(class_name='training.networks_edm2.Precond'),
    loss_kwargs=dict(class_name='training.training_loop.EDM2Loss'),
    optimizer_kwargs=dict(class_name='torch.optim.Adam', betas=(0.9, 0.99)),
    lr_kwargs=dict(func_name='training.training_loop.learning_rate_schedule'),
    ema_kwargs=dict(class_name='training.phema.PowerFunctionEMA'),
    run_dir='.', seed=0, batch_size=2048, batch_gpu=None,
    total_nimg=8 << 30, slice_nimg=None, status_nimg=128 << 10, snapshot_nimg=8 << 20, checkpoint_nimg=128 << 20,
    checkpoint_keep_recent=None, loss_scaling=1, force_finite=True, max_nonfinite_steps=8, cudnn_benchmark=True,
    device=None, ddp_kwargs={}, validation_kwargs=None, wandb_kwargs=None,
):
    """Train `network_kwargs` on `dataset_kwargs` with the method `loss_kwargs`, resuming from the
    newest readable training-state-*.pt in `run_dir`.

    Sizes count images: `batch_size` per optimizer step over all processes, `batch_gpu` per process
    and forward pass (None: no gradient accumulation); `total_nimg` ends training, `slice_nimg`
    ends this session early (and requests suspension); the `*_nimg` intervals time status lines,
    snapshots and checkpoints (0 disables); `checkpoint_keep_recent` N deletes all but the newest N
    training states after each save (None keeps all). `data_loader_kwargs` None picks defaults for
    `device` (None: CUDA when available, else CPU). `force_finite` zeroes NaN/Inf gradients, as
    EDM2 does; `max_nonfinite_steps` consecutive steps with them stop the run (0: never).
    `ddp_kwargs` go to DistributedDataParallel; `validation_kwargs` (e.g. class_name=
    'training.monitoring.Validator') evaluates snapshots while training runs, and `wandb_kwargs`
    (class_name='training.wandb_logging.WandbLogger') sends statistics, validation results and sample
    grids to Weights & Biases from rank 0. The options are recorded in
    run_dir/training_options.json, and a resumed run must keep all but the schedule (see
    record_run_options).
    """
    options = {name: value for name, value in locals().items() if name not in ('run_dir', 'device')}
    device = misc.default_device() if device is None else torch.device(device)
    data_loader_kwargs = default_data_loader_kwargs(device) if data_loader_kwargs is None else data_loader_kwargs
    start_time = time.time()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    session_log_start = _file_size(os.path.join(run_dir, 'log.txt'))
    batch_gpu, rounds = split_batch(batch_size, batch_gpu, world_size)
    check_intervals(batch_size, total_nimg, slice_nimg, status_nimg, snapshot_nimg, checkpoint_nimg)
    record_run_options(run_dir, options)
    if rank == 0:
        dist.remove_stale_temporaries(run_dir)
    misc.set_random_seed(seed, rank)
    _configure_torch_backends(cudnn_benchmark)
    opts = dnnlib.EasyDict(batch_size=batch_size, batch_gpu_total=batch_size // world_size, rounds=rounds,
        seed=seed, loss_scaling=loss_scaling, force_finite=force_finite, lr_kwargs=lr_kwargs)

    dist.print0('Loading dataset...')
    dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    encoder = dnnlib.util.construct_class_by_name(**encoder_kwargs)
    dist.node_first(encoder.init, device)  # a VAE is downloaded once per node
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    latent_shape, label_dim = latent_shape_and_label_dim(dataset, encoder, device)
    if hasattr(loss_fn, 'prepare'):
        loss_fn.prepare(encoder=encoder, latent_shape=latent_shape, label_dim=label_dim, device=device)

    dist.print0('Constructing network...')
    net = _build_network(latent_shape, label_dim, network_kwargs, device, loss_fn)
    _print_network_summary(net, batch_gpu, device)
    ddp = _wrap_ddp(net, device, ddp_kwargs)  # DDP copies rank 0's initial weights to every rank

    dist.print0('Setting up training state...')
    optimizer = dnnlib.util.construct_class_by_name(net.parameters(), **optimizer_kwargs)
    ema = None if ema_kwargs is None else dnnlib.util.construct_class_by_name(net=net, **ema_kwargs)
    state = dnnlib.EasyDict(cur_nimg=0, total_elapsed_time=0.0)
    checkpoint = dist.CheckpointIO(state=state, net=net, loss_fn=loss_fn, optimizer=optimizer, ema=ema)
    resumed_from = checkpoint.load_latest(run_dir)
    dist.check_same_on_all_ranks(resumed_from and os.path.basename(resumed_from), lambda names: (
        f'The processes found different training states to resume from in {run_dir} (per rank: {names}); '
        'on several machines the run directory must be on a filesystem that all of them share'))
    if rank == 0:
        _rewind_logs(run_dir, state, session_log_start, resumed=resumed_from is not None)
    validator = None
    if validation_kwargs is not None:
        validator = dnnlib.util.construct_class_by_name(**validation_kwargs, run_dir=run_dir)
        validator.start(state.cur_nimg, resumed=resumed_from is not None)
    start_nimg = state.cur_nimg
    stop_at_nimg = _stop_point(start_nimg, total_nimg, slice_nimg, checkpoint_nimg or snapshot_nimg or batch_size)
    if start_nimg >= stop_at_nimg:
        raise dnnlib.UserError(f'Nothing to train: the run in {run_dir} is already at {start_nimg} images and this '
            f'session would stop at {stop_at_nimg}; raise the duration (--duration) to continue it', option='total_nimg')
    wandb_run = None
    if wandb_kwargs is not None and rank == 0:
        wandb_run = dnnlib.util.construct_class_by_name(**wandb_kwargs, run_dir=run_dir, options=options)

    sampler = misc.InfiniteSampler(dataset, rank=rank, num_replicas=world_size, seed=seed, start_idx=start_nimg)
    batches = iter(dnnlib.util.construct_class_by_name(dataset=dataset, sampler=sampler, batch_size=batch_gpu,
        **data_loader_kwargs))
    dist.print0(f'Training from {start_nimg // 1000} kimg to {stop_at_nimg // 1000} kimg:')
    dist.print0()

    last_state = resumed_from
    def save_training_state():
        nonlocal last_state
        state.log_bytes = _file_size(os.path.join(run_dir, 'log.txt'))  # where the log resumes from
        last_state = os.path.join(run_dir, f'training-state-{state.cur_nimg // 1000:07d}.pt')
        checkpoint.save(last_state)
        if checkpoint_keep_recent is not None and rank == 0:
            dist.remove_old_checkpoints(run_dir, keep=checkpoint_keep_recent)

    nonfinite = NonFiniteSteps(device)
    elapsed_before, session_start = state.total_elapsed_time, time.time()
    tick_start_time, tick_start_nimg, maintenance_sec, validation_sec = start_time, start_nimg, 0.0, 0.0
    while True:
        done = state.cur_nimg >= stop_at_nimg
        at_resumed_start = state.cur_nimg == start_nimg != 0
        tick_end_time = time.time()
        state.total_elapsed_time = elapsed_before + (tick_end_time - session_start)

        is_status = status_nimg and (done or state.cur_nimg % status_nimg == 0) and not at_resumed_start
        if is_status:
            _report_status(run_dir, state.cur_nimg, state.total_elapsed_time, tick_end_time - tick_start_time - validation_sec,
                state.cur_nimg - tick_start_nimg, maintenance_sec, device)
            validation_sec = 0.0  # validation from here on counts against the next tick
            if wandb_run is not None:
                wandb_run.log_stats(state.cur_nimg, {name: stat.mean for name, stat in
                    training_stats.default_collector.as_dict().items()})
            dist.update_progress(state.cur_nimg // 1000, total_nimg // 1000)
            done = done or dist.should_stop() or dist.should_suspend()

        is_snapshot = snapshot_nimg and state.cur_nimg % snapshot_nimg == 0 and not at_resumed_start
        is_checkpoint = checkpoint_nimg and (done or state.cur_nimg % checkpoint_nimg == 0) and state.cur_nimg != start_nimg
        if is_status or is_snapshot or is_checkpoint or done:
            nonfinite.check(max_nonfinite_steps, state.cur_nimg, last_state)
        if is_snapshot or is_checkpoint:
            check_finite_parameters(net, state.cur_nimg, last_state)
        if is_snapshot:
            snapshots = _save_snapshots(run_dir, state.cur_nimg, ema, net, encoder, dataset_kwargs, loss_fn)
            if validator is not None and validator.due(state.cur_nimg, snapshot_nimg, fresh_start=state.cur_nimg == 0):
                validation_sec += validator.validate(state.cur_nimg, snapshots, loss_fn)
                if wandb_run is not None:
                    wandb_run.log_validation(state.cur_nimg, validator.last_rows, validator.grid)
        if is_checkpoint:
            save_training_state()
            misc.check_ddp_consistency(net)

        if done:
            if state.cur_nimg < total_nimg:
                dist.request_suspend()
            break

        if is_status:
            maintenance_sec = time.time() - tick_end_time - validation_sec
            tick_start_time, tick_start_nimg = tick_end_time, state.cur_nimg
        try:
            step_batches = _next_batches(batches, rounds)
        except dnnlib.UserError as err:  # an unreadable sample: keep the work done so far
            if checkpoint_nimg and state.cur_nimg != start_nimg and world_size == 1:
                save_training_state()
                raise dnnlib.UserError(f'{err}. Training stopped at {state.cur_nimg // 1000} kimg after saving its state; '
                    'replace the file (dataset_tool.py check lists every unreadable sample) and rerun to resume') from None
            raise
        nonfinite.update(_training_step(ddp, net, loss_fn, encoder, optimizer, step_batches, state.cur_nimg, device, opts))
        state.cur_nimg += batch_size
        if ema is not None:
            ema.update(cur_nimg=state.cur_nimg, batch_size=batch_size)

    if wandb_run is not None:
        wandb_run.finish()
    dist.print0()
    dist.print0('Exiting...')

#----------------------------------------------------------------------------
