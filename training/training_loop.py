"""EDM2 training: the denoising loss, the learning-rate schedule and the main training loop.

The loop is loss-agnostic: it builds the loss from `loss_kwargs` and calls it as
`loss_fn(net=..., images=latents, labels=...)`, so other objectives (e.g. consistency
distillation) reuse it unchanged.
"""

import copy
import functools
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
from training import distill

#----------------------------------------------------------------------------
# Loss of EDM2 (Karras et al. 2024, Eq. 21): log-normal noise levels and a learned
# per-sigma uncertainty u(sigma) that balances the loss across noise levels.

@persistence.persistent_class
class EDM2Loss:
    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

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

def default_device():
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def default_data_loader_kwargs(device):
    if device.type == 'cuda':
        return dict(class_name='torch.utils.data.DataLoader', pin_memory=True, num_workers=2, prefetch_factor=2)
    # On CPU, loader worker processes would compete with training for the same cores.
    return dict(class_name='torch.utils.data.DataLoader', pin_memory=False, num_workers=0)


def split_batch(batch_size, batch_gpu, world_size):
    """Return (per-process batch per round, accumulation rounds) for a global `batch_size`."""
    batch_gpu_total = batch_size // world_size
    if batch_gpu is None or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    if batch_gpu < 1 or batch_size != batch_gpu_total * world_size or batch_gpu_total % batch_gpu != 0:
        raise ValueError(f'batch_size={batch_size} must split evenly into {world_size} process(es) '
            f'times a whole number of rounds of batch_gpu={batch_gpu}')
    return batch_gpu, batch_gpu_total // batch_gpu


def check_intervals(batch_size, total_nimg, slice_nimg, status_nimg, snapshot_nimg, checkpoint_nimg):
    """Every interval must fall on optimizer-step boundaries; snapshots also on multiples of 1024 images."""
    step_aligned = dict(total_nimg=total_nimg, slice_nimg=slice_nimg, status_nimg=status_nimg)
    for name, value in step_aligned.items():
        if value and value % batch_size != 0:
            raise ValueError(f'{name}={value} must be a multiple of batch_size={batch_size}')
    for name, value in dict(snapshot_nimg=snapshot_nimg, checkpoint_nimg=checkpoint_nimg).items():
        if value and (value % batch_size != 0 or value % 1024 != 0):
            raise ValueError(f'{name}={value} must be a multiple of both 1024 and batch_size={batch_size}')


def freeze_parameters(net, prefixes):
    """Exclude the parameters whose names start with any of `prefixes` from training."""
    for prefix in prefixes:
        matched = [param for name, param in net.named_parameters() if name.startswith(prefix)]
        if not matched:
            raise ValueError(f'frozen_params: no parameter name of {type(net).__name__} starts with {prefix!r}')
        for param in matched:
            param.requires_grad_(False)


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
    if dist.get_rank() == 0:
        _append_stats_jsonl(run_dir, training_stats.default_collector)

#----------------------------------------------------------------------------
# Network snapshots: one pickle per EMA profile, with the network in float16 on the CPU.

def _save_snapshots(run_dir, cur_nimg, ema, net, encoder, dataset_kwargs, loss_fn, cd_metadata):
    averaged = ema.get() if ema is not None else [(net, '')]
    for ema_net, suffix in averaged:
        extras = dict(loss_fn=loss_fn) if cd_metadata is None else dict(cd=cd_metadata)
        data = dnnlib.EasyDict(encoder=encoder, dataset_kwargs=dnnlib.EasyDict(dataset_kwargs), **extras)
        data.ema = copy.deepcopy(ema_net).cpu().eval().requires_grad_(False).to(torch.float16)
        path = os.path.join(run_dir, f'network-snapshot-{cur_nimg // 1000:07d}{suffix}.pkl')
        dist.print0(f'Saving {path} ... ', end='', flush=True)
        with open(path, 'wb') as f:
            pickle.dump(data, f)
        dist.print0('done')

#----------------------------------------------------------------------------

def _training_step(ddp, net, loss_fn, encoder, optimizer, batches, cur_nimg, device, opts):
    """One optimizer step over `opts.batch_size` images, accumulated over `opts.rounds` forward passes."""
    lr = dnnlib.util.call_func_by_name(cur_nimg=cur_nimg, batch_size=opts.batch_size, **opts.lr_kwargs)
    misc.set_random_seed(opts.seed, dist.get_rank(), cur_nimg)
    optimizer.zero_grad(set_to_none=True)
    if hasattr(loss_fn, 'set_global_kimg'):
        loss_fn.set_global_kimg(cur_nimg / 1e3)
    for round_idx in range(opts.rounds):
        with misc.ddp_sync(ddp, sync=(round_idx == opts.rounds - 1)):
            images, labels = next(batches)
            loss = loss_fn(net=ddp, images=encoder.encode_latents(images.to(device)), labels=labels.to(device))
            training_stats.report('Loss/loss', loss)
            (loss.sum() * (opts.loss_scaling / opts.batch_gpu_total)).backward()

    training_stats.report('Loss/learning_rate', lr)
    grad_norm, num_bad = sanitize_gradients(net.parameters(), opts.force_finite)
    training_stats.report('Loss/grad_norm', grad_norm)
    training_stats.report('Loss/nan_inf_grad_count', num_bad)
    for group in optimizer.param_groups:
        group['lr'] = lr
    optimizer.step()

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


def _setup_teacher(teacher_pkl, encoder, latent_shape, label_dim, loss_fn, device):
    """Load and check the frozen teacher, give it to the loss; return the student seeding function
    and the snapshot metadata."""
    dist.print0(f'Loading teacher from {teacher_pkl}...')
    teacher, teacher_encoder = dist.node_first(distill.load_teacher_pickle, teacher_pkl)
    distill.check_teacher(teacher, teacher_encoder, encoder, latent_shape, label_dim)
    loss_fn.attach_teacher(teacher.to(device))
    return functools.partial(distill.seed_student_from_teacher, teacher=teacher), distill.snapshot_metadata(loss_fn, teacher_pkl)


def _build_network(latent_shape, label_dim, network_kwargs, device, init_net_fn, frozen_params):
    net = dnnlib.util.construct_class_by_name(**network_kwargs,
        img_resolution=latent_shape[-1], img_channels=latent_shape[1], label_dim=label_dim)
    net.train().requires_grad_(True).to(device)
    if init_net_fn is not None:
        init_net_fn(net)
    freeze_parameters(net, frozen_params)
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
    loss_scaling=1, force_finite=True, cudnn_benchmark=True, device=None,
    init_net_fn=None, frozen_params=(), ddp_kwargs={}, cd_metadata=None, teacher_pkl=None, checkpoint_keep_recent=None,
):
    """Train `network_kwargs` on `dataset_kwargs` with `loss_kwargs`, resuming from the newest
    training-state-*.pt in `run_dir`.

    Sizes count images: `batch_size` per optimizer step over all processes, `batch_gpu` per process
    and forward pass (None: no gradient accumulation); `total_nimg` ends training, `slice_nimg`
    ends this session early (and requests suspension); the `*_nimg` intervals time status lines,
    snapshots and checkpoints (0 disables); `checkpoint_keep_recent` N deletes all but the newest N
    training states after each save (None keeps all). `data_loader_kwargs` None picks defaults for `device`
    (None: CUDA when available, else CPU). `force_finite` zeroes NaN/Inf gradients.
    Hooks for other objectives: `init_net_fn(net)` initialises the fresh network (e.g. from a
    teacher); `frozen_params` lists parameter-name prefixes to exclude from training; `ddp_kwargs`
    go to DistributedDataParallel; a `cd_metadata` dict is stored under 'cd' in snapshots, which
    then omit the loss object. `teacher_pkl` (path or URL of a network pickle) turns on consistency
    distillation: the teacher is loaded (also on resume), checked against the data, attached to the
    loss and copied into the fresh student; snapshots get the student's 'cd' metadata.
    """
    device = default_device() if device is None else torch.device(device)
    data_loader_kwargs = default_data_loader_kwargs(device) if data_loader_kwargs is None else data_loader_kwargs
    start_time = time.time()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    misc.set_random_seed(seed, rank)
    _configure_torch_backends(cudnn_benchmark)
    batch_gpu, rounds = split_batch(batch_size, batch_gpu, world_size)
    check_intervals(batch_size, total_nimg, slice_nimg, status_nimg, snapshot_nimg, checkpoint_nimg)
    opts = dnnlib.EasyDict(batch_size=batch_size, batch_gpu_total=batch_size // world_size, rounds=rounds,
        seed=seed, loss_scaling=loss_scaling, force_finite=force_finite, lr_kwargs=lr_kwargs)

    dist.print0('Loading dataset...')
    dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    encoder = dnnlib.util.construct_class_by_name(**encoder_kwargs)
    dist.node_first(encoder.init, device)  # a VAE is downloaded once per node
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    latent_shape, label_dim = latent_shape_and_label_dim(dataset, encoder, device)
    if teacher_pkl is not None:
        init_net_fn, cd_metadata = _setup_teacher(teacher_pkl, encoder, latent_shape, label_dim, loss_fn, device)

    dist.print0('Constructing network...')
    net = _build_network(latent_shape, label_dim, network_kwargs, device, init_net_fn, frozen_params)
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
    start_nimg = state.cur_nimg
    stop_at_nimg = _stop_point(start_nimg, total_nimg, slice_nimg, checkpoint_nimg or snapshot_nimg or batch_size)
    if start_nimg >= stop_at_nimg:
        raise RuntimeError(f'Nothing to train: the run in {run_dir} is already at {start_nimg} images and this '
            f'session would stop at {stop_at_nimg}; raise total_nimg (--duration) to continue it')

    sampler = misc.InfiniteSampler(dataset, rank=rank, num_replicas=world_size, seed=seed, start_idx=start_nimg)
    batches = iter(dnnlib.util.construct_class_by_name(dataset=dataset, sampler=sampler, batch_size=batch_gpu,
        **data_loader_kwargs))
    dist.print0(f'Training from {start_nimg // 1000} kimg to {stop_at_nimg // 1000} kimg:')
    dist.print0()

    elapsed_before, session_start = state.total_elapsed_time, time.time()
    tick_start_time, tick_start_nimg, maintenance_sec = start_time, start_nimg, 0.0
    while True:
        done = state.cur_nimg >= stop_at_nimg
        at_resumed_start = state.cur_nimg == start_nimg != 0
        tick_end_time = time.time()
        state.total_elapsed_time = elapsed_before + (tick_end_time - session_start)

        is_status = status_nimg and (done or state.cur_nimg % status_nimg == 0) and not at_resumed_start
        if is_status:
            _report_status(run_dir, state.cur_nimg, state.total_elapsed_time, tick_end_time - tick_start_time,
                state.cur_nimg - tick_start_nimg, maintenance_sec, device)
            dist.update_progress(state.cur_nimg // 1000, total_nimg // 1000)
            done = done or dist.should_stop() or dist.should_suspend()

        if snapshot_nimg and state.cur_nimg % snapshot_nimg == 0 and not at_resumed_start and rank == 0:
            _save_snapshots(run_dir, state.cur_nimg, ema, net, encoder, dataset_kwargs, loss_fn, cd_metadata)

        if checkpoint_nimg and (done or state.cur_nimg % checkpoint_nimg == 0) and state.cur_nimg != start_nimg:
            checkpoint.save(os.path.join(run_dir, f'training-state-{state.cur_nimg // 1000:07d}.pt'))
            if checkpoint_keep_recent is not None and rank == 0:
                dist.remove_old_checkpoints(run_dir, keep=checkpoint_keep_recent)
            misc.check_ddp_consistency(net)

        if done:
            if state.cur_nimg < total_nimg:
                dist.request_suspend()
            break

        if is_status:
            maintenance_sec = time.time() - tick_end_time
            tick_start_time, tick_start_nimg = tick_end_time, state.cur_nimg
        _training_step(ddp, net, loss_fn, encoder, optimizer, batches, state.cur_nimg, device, opts)
        state.cur_nimg += batch_size
        if ema is not None:
            ema.update(cur_nimg=state.cur_nimg, batch_size=batch_size)

    dist.print0()
    dist.print0('Exiting...')

#----------------------------------------------------------------------------
