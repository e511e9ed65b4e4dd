"""Cost of consistency distillation next to EDM2 training, and of S-step student sampling.

In one run on one network architecture and one batch, this times
  * a plain EDM2 training step (EDM2Loss forward, backward, Adam) on a train-mode network,
  * a CD training step (EDMConsistencyDistillLoss with a frozen eval-mode teacher and a student
    seeded from it; forward, backward, Adam), with a breakdown of where its time goes, read from
    the named torch.profiler ranges inside the loss during a few profiled steps,
  * an sCD training step (training/loss_scm.SCDLoss on the same teacher and another student seeded from
    it: the teacher's velocity, the student's forward, its JVP, backward, Adam),
  * generate_images.consistency_sampler against S bare network evaluations of the same batch,
and the peak memory of both training steps. docs/benchmarks.md explains each measurement.

    python bench/bench_cd.py --net-size=tiny --batch=16 --S=8 --T=256 [--teacher_solver=ddim]
        [--guidance=2 [--guide-size=tiny]]

--teacher_solver picks the teacher's step along an edge (heun, ddim or addim), as the loss option of
the same name does; the report names the one it timed. --guidance distils a guided teacher: every
teacher evaluation also evaluates a frozen guide network, of the student's size or of --guide-size
(with the teacher's resolution, channels and labels); the report names the guide and its size.
"""

import concurrent.futures
import contextlib
import multiprocessing
import os
import platform
import re
import statistics
import sys
import time
import warnings

import click
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, for direct runs

import dnnlib
import dnnlib.cli
import generate_images
from torch_utils import misc
from torch_utils import training_stats
from training import loss_cd
from training import loss_scm
from training import training_loop
from training.networks_edm2 import Precond

#----------------------------------------------------------------------------
# Network sizes: keyword arguments of training.networks_edm2.Precond.

NET_SIZES = {
    'tiny':         dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2],
                         num_blocks=1, attn_resolutions=[8]),
    'small':        dict(img_resolution=32, img_channels=3, label_dim=10, model_channels=64, channel_mult=[1, 2, 2],
                         num_blocks=2, attn_resolutions=[16, 8]),
    'edm2-img64-s': dict(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192,
                         channel_mult=[1, 2, 3, 4]),
}

ADAM_KWARGS = dict(lr=1e-4, betas=(0.9, 0.99), eps=1e-8)  # EDM2's betas; the rate does not affect timings

#----------------------------------------------------------------------------
# The two training setups on identical weights and data.

def build_guide(teacher, guide_size, fp16, device, seed):
    """A frozen guide with the architecture of `guide_size` and the teacher's interface sizes, seeded on
    its own so that the other networks and the batch are those of an unguided setup."""
    interface = dict(img_resolution=teacher.img_resolution, img_channels=teacher.img_channels, label_dim=teacher.label_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        guide = Precond(**dict(NET_SIZES[guide_size], **interface), use_fp16=fp16)
    return guide.eval().requires_grad_(False).to(device)


def build_setup(net_size, batch, S, T, dropout, fp16, device, seed, teacher_solver='heun', guidance=1.0, guide_size=None):
    """Plain EDM2 network, CD teacher and student (all with the same initial weights), losses and batch;
    with guidance != 1 also the teacher's guide (of guide_size, default net_size)."""
    torch.manual_seed(seed)
    net_kwargs = dict(NET_SIZES[net_size], use_fp16=fp16, dropout=dropout)
    plain_net = Precond(**net_kwargs).train().requires_grad_(True).to(device)
    teacher = Precond(**net_kwargs).to(device)
    misc.copy_params_and_buffers(plain_net, teacher, require_all=True)
    student = Precond(**net_kwargs).train().requires_grad_(True).to(device)
    misc.copy_params_and_buffers(teacher, student, require_all=True)
    student.logvar_linear.requires_grad_(False)  # CD never trains the uncertainty head
    guide = None if guidance == 1 else build_guide(teacher, guide_size or net_size, fp16, device, seed)

    cd_loss = loss_cd.EDMConsistencyDistillLoss(teacher, S=S, T_start=T, T_end=T, T_anneal_kimg=0,
        teacher_solver=teacher_solver, guide_net=guide, guidance=guidance)
    channels, resolution = plain_net.img_channels, plain_net.img_resolution
    images = torch.randn([batch, channels, resolution, resolution], device=device) * cd_loss.sigma_data
    labels = torch.eye(plain_net.label_dim, device=device)[torch.randint(plain_net.label_dim, [batch], device=device)]
    scd_student = Precond(**net_kwargs).train().requires_grad_(True).to(device)  # after the batch, which stays as it was
    misc.copy_params_and_buffers(teacher, scd_student, require_all=True)
    return dnnlib.EasyDict(
        device=torch.device(device), images=images, labels=labels, teacher=teacher, guide=guide, cd_loss=cd_loss,
        plain_net=plain_net, plain_loss=training_loop.EDM2Loss(), plain_opt=adam(plain_net),
        student=student, student_opt=adam(student),
        scd_loss=loss_scm.SCDLoss(teacher_net=teacher), scd_student=scd_student, scd_opt=adam(scd_student))


def adam(net):
    return torch.optim.Adam([param for param in net.parameters() if param.requires_grad], **ADAM_KWARGS)


def training_step(net, loss_fn, optimizer, images, labels, seed, cur_nimg, host_reads=None):
    """One optimizer step as the training loop takes it, including its per-step reseed. A HostReadCounter
    given as host_reads counts the loss and its backward pass."""
    misc.set_random_seed(seed, 0, cur_nimg)
    optimizer.zero_grad(set_to_none=True)
    if hasattr(loss_fn, 'set_progress'):
        loss_fn.set_progress(cur_nimg)
    with host_reads or contextlib.nullcontext():
        loss = loss_fn(net=net, images=images, labels=labels)
        training_stats.report('Loss/loss', loss)
        (loss.sum() / images.shape[0]).backward()
    with torch.profiler.record_function('bench/optimizer'):
        training_loop.sanitize_gradients(net.parameters())
        optimizer.step()


def plain_step(setup, seed, cur_nimg, host_reads=None):
    training_step(setup.plain_net, setup.plain_loss, setup.plain_opt, setup.images, setup.labels, seed, cur_nimg,
        host_reads)


def cd_step(setup, seed, cur_nimg, host_reads=None):
    training_step(setup.student, setup.cd_loss, setup.student_opt, setup.images, setup.labels, seed, cur_nimg,
        host_reads)


def scd_step(setup, seed, cur_nimg):
    training_step(setup.scd_student, setup.scd_loss, setup.scd_opt, setup.images, setup.labels, seed, cur_nimg)

#----------------------------------------------------------------------------
# Timing.

def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(device, fn):
    """(fn(), wall-clock seconds), with the device's queued work finished on both ends."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def edge_class_counts(setup, before):
    """Rows per edge class that the CD loss drew since its edge counters read `before`."""
    return {name: setup.cd_loss.edge_counts[name] - before[name] for name in ('terminal', 'boundary', 'general')}


def alternating(pairs, rep):
    """The (name, fn) pairs in their order on even reps and reversed on odd ones, so that drifting
    machine load and warm caches favour neither side."""
    return pairs if rep % 2 == 0 else pairs[::-1]

#----------------------------------------------------------------------------
# Breakdown of the CD step from the named ranges of a torch.profiler trace.

# Row of the breakdown -> names of the profiler ranges it sums. The cd/ ranges are the ones that
# training/loss_cd.py opens inside the real loss; bench/optimizer is opened by training_step() above.
BREAKDOWN_RANGES = {
    'teacher':    ('cd/teacher_hop', 'cd/terminal_teacher'),
    'forward':    ('cd/student_forward',),
    'target':     ('cd/target_pass',),
    'bookkeeping': ('cd/draw_edges', 'cd/classify_edges', 'cd/distance', 'cd/diagnostics'),
    'optimizer':  ('bench/optimizer',),
}
# The loss has no range around the backward pass (it happens after the loss returns); autograd
# labels the evaluation of every node of the graph with a name that starts like this.
BACKWARD_PREFIX = 'autograd::engine::evaluate_function: '
PROFILED_STEPS = 5  # at most this many steps of each kind are profiled (fewer when --reps is smaller)


def breakdown_part(name):
    """The breakdown row that profiler event `name` belongs to, or None."""
    if name.startswith(BACKWARD_PREFIX):
        return 'backward'
    for part, ranges in BREAKDOWN_RANGES.items():
        if name in ranges:
            return part
    return None


def event_seconds(event, device):
    """Time of a profiler event and everything under it: host wall time on CPU, kernel time on CUDA."""
    if device.type == 'cuda':
        return event.device_time_total
    return event.cpu_time_total


def part_seconds(events, device):
    """Seconds per breakdown row in a list of profiler events, counting each labelled event that lies
    inside no other labelled event (so nothing is counted twice)."""
    seconds = {part: 0.0 for part in ('teacher', 'forward', 'backward', 'target', 'bookkeeping', 'optimizer')}
    for event in events:
        part = breakdown_part(event.name)
        if part is None or event.device_type != torch.autograd.DeviceType.CPU:
            continue  # on CUDA, also skips the device-side copies of the ranges
        parent, nested = event.cpu_parent, False
        while parent is not None and not nested:
            nested, parent = breakdown_part(parent.name) is not None, parent.cpu_parent
        if not nested:
            seconds[part] += 1e-6 * event_seconds(event, device)  # the profiler reports microseconds
    return seconds


def profiled_step(setup, step, seed, cur_nimg):
    """(profiler events, wall-clock seconds) of one step run under torch.profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if setup.device.type == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        _, seconds = timed(setup.device, lambda: step(setup, seed, cur_nimg))
    return prof.events(), seconds


def time_training(setup, seed, warmup, reps):
    """Per-rep seconds of the plain, the CD and the sCD step, and the edge class counts of each CD step; and
    from the first PROFILED_STEPS timed reps, the seconds of a profiled plain and CD step and the
    CD step's parts.

    The profiled steps run right after the timed ones of the same rep and at the same cur_nimg, so
    they draw the same edges and see the same machine load. The last warm-up rep (if any) profiles
    too, unrecorded, so that starting the profiler the first time costs no recorded step.
    """
    batch = setup.images.shape[0]
    samples = dnnlib.EasyDict(plain=[], cd=[], scd=[], counts=[], profiled=dnnlib.EasyDict(plain=[], cd=[], parts=[]))
    pairs = [('plain', plain_step), ('cd', cd_step)]
    for rep in range(warmup + reps):
        cur_nimg = rep * batch
        counts_before = dict(setup.cd_loss.edge_counts)
        seconds = dict()
        for name, step in alternating(pairs + [('scd', scd_step)], rep):
            _, seconds[name] = timed(setup.device, lambda: step(setup, seed, cur_nimg))
        counts = edge_class_counts(setup, counts_before)
        profiled = dict()
        if warmup - 1 <= rep < warmup + PROFILED_STEPS:
            for name, step in alternating(pairs, rep):
                profiled[name] = profiled_step(setup, step, seed, cur_nimg)
        if rep >= warmup:
            samples.plain.append(seconds['plain'])
            samples.cd.append(seconds['cd'])
            samples.scd.append(seconds['scd'])
            samples.counts.append(counts)
            if profiled:
                samples.profiled.plain.append(profiled['plain'][1])
                samples.profiled.cd.append(profiled['cd'][1])
                samples.profiled.parts.append(part_seconds(profiled['cd'][0], setup.device))
    return samples

#----------------------------------------------------------------------------
# Sampling.

def sampler_inputs(net, noise, labels, S, grid):
    """The (x, sigma) pairs that consistency_sampler passes to the network, in order."""
    inputs = []
    def recording_net(x, sigma, class_labels):
        inputs.append((x.clone(), sigma))
        return net(x, sigma, class_labels)
    generate_images.consistency_sampler(recording_net, noise, labels, num_steps=S, **grid)
    return inputs


def time_sampling(setup, S, seed, warmup, reps):
    """Per-rep seconds of the S-step consistency sampler and of S bare evaluations of the student
    on the very inputs the sampler gives it (so both sides see the same values)."""
    net, labels, loss = setup.student.eval(), setup.labels, setup.cd_loss
    grid = dict(sigma_min=loss.sigma_min, sigma_max=loss.sigma_max, rho=loss.rho)
    torch.manual_seed(seed)
    noise = torch.randn_like(setup.images)
    with torch.no_grad():
        inputs = sampler_inputs(net, noise, labels, S, grid)

    def raw():
        for x, sigma in inputs:
            net(x, sigma, labels)

    def sampler():
        return generate_images.consistency_sampler(net, noise, labels, num_steps=S, **grid)

    samples = dnnlib.EasyDict(sampler=[], raw=[])
    with torch.no_grad():
        for rep in range(warmup + reps):
            for name, fn in alternating([('sampler', sampler), ('raw', raw)], rep):
                _, seconds = timed(setup.device, fn)
                if rep >= warmup:
                    samples[name].append(seconds)
    setup.student.train()
    return samples

#----------------------------------------------------------------------------
# Host synchronisations.

# Operations whose result the host needs from a tensor's data (a value, or a shape that depends on the
# values): on CUDA each one waits for the GPU to finish the work queued before it. Indexing with a
# boolean mask is one too (it finds the mask's True entries first).
HOST_READ_OPS = frozenset({'_local_scalar_dense', 'nonzero', 'masked_select', 'is_nonzero', 'equal',
    '_unique2', 'unique_dim', 'unique_consecutive'})
INDEXING_OPS = frozenset({'index', 'index_put', 'index_put_', '_index_put_impl_'})


def reads_host(func, args):
    name = func.overloadpacket.__name__
    if name in INDEXING_OPS:
        return any(torch.is_tensor(index) and index.dtype in (torch.bool, torch.uint8) for index in args[1])
    return name in HOST_READ_OPS


class HostReadCounter(TorchDispatchMode):
    """Counts the operations that run while it is active and read tensor values on the host (reads_host)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += reads_host(func, args)
        return func(*args, **(kwargs or {}))


def count_host_syncs(setup, step, seed, cur_nimg):
    """Host synchronisations in one step. On CUDA, the synchronising calls that torch flags
    (set_sync_debug_mode) in the whole step. On the CPU, which has nothing to wait for, the reads of
    tensor values in the loss and its backward pass (HostReadCounter); the optimizer is left out because
    Adam keeps its step counts on the host on every device, and copies to the host cannot be seen there."""
    if setup.device.type != 'cuda':
        counter = HostReadCounter()
        step(setup, seed, cur_nimg, host_reads=counter)
        return counter.count
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            step(setup, seed, cur_nimg)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum('synchroniz' in str(warning.message).lower() for warning in caught)


def host_syncs(setup, seed, cur_nimg):
    return {name: count_host_syncs(setup, step, seed, cur_nimg) for name, step in (('plain', plain_step), ('cd', cd_step))}

#----------------------------------------------------------------------------
# Memory.

def resident_bytes(*objects):
    """Bytes held between steps by the given modules (parameters, buffers) and optimizers (state)."""
    tensors = []
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            tensors += misc.params_and_buffers(obj)
        else:
            tensors += [value for state in obj.state.values() for value in state.values() if torch.is_tensor(value)]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def cuda_step_peak(setup, step, seed, cur_nimg):
    """Peak allocated CUDA memory during one step, above what was allocated before it."""
    device = setup.device
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(setup, seed, cur_nimg)
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _proc_status_bytes(field):
    with open('/proc/self/status') as f:
        return int(re.search(rf'^{field}:\s+(\d+) kB', f.read(), re.MULTILINE).group(1)) * 1024


def rss_step_peak(setup, step, seed, cur_nimg):
    """Peak resident set size during one step, above the resident set size before it (Linux)."""
    before = _proc_status_bytes('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets the high-water mark VmHWM to the current RSS
    step(setup, seed, cur_nimg)
    return _proc_status_bytes('VmHWM') - before


def step_peaks(setup, seed, peak_fn):
    """Transient peak of a plain and of a CD step, each measured after one unmeasured step of its kind."""
    batch = setup.images.shape[0]
    peaks = dict()
    for name, step in (('plain', plain_step), ('cd', cd_step)):
        step(setup, seed, 0)
        peaks[name] = peak_fn(setup, step, seed, batch)
    return peaks


def _cpu_step_peaks(build_kwargs, seed):
    return step_peaks(build_setup(**build_kwargs), seed, rss_step_peak)


def cpu_step_peaks_in_fresh_process(build_kwargs, seed):
    """Run step_peaks() in a new process whose malloc returns every buffer of >= 64 KiB to the OS on free.

    Then RSS follows the live tensors, and earlier steps leave no cached heap to hide a step's peak.
    """
    previous = os.environ.get('MALLOC_MMAP_THRESHOLD_')
    os.environ['MALLOC_MMAP_THRESHOLD_'] = str(64 << 10)
    try:
        context = multiprocessing.get_context('spawn')
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            future = pool.submit(_cpu_step_peaks, build_kwargs, seed)
    finally:
        if previous is None:
            del os.environ['MALLOC_MMAP_THRESHOLD_']
        else:
            os.environ['MALLOC_MMAP_THRESHOLD_'] = previous
    return future.result()

#----------------------------------------------------------------------------
# Report.

def describe_device(device):
    if device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})'
    model = platform.processor() or 'unknown CPU'
    if os.path.isfile('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as f:
            found = re.search(r'^model name\s*:\s*(.+)$', f.read(), re.MULTILINE)
        model = found.group(1).strip() if found else model
    return f'{model}; {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads'


SOLVER_NAMES = dict(heun='Heun', ddim='DDIM', addim='aDDIM')  # as the breakdown row names the teacher's hop


def progress(message):
    """A stage line on stderr, so that a slow or stopped run shows how far it got."""
    print(f'[{time.strftime("%H:%M:%S")}] {message} ...', file=sys.stderr, flush=True)


def load_average():
    return '/'.join(f'{value:.2f}' for value in os.getloadavg())


def print_report(setup, config, training, syncs, sampling, peaks):
    ms = lambda seconds: 1e3 * seconds
    median = statistics.median
    plain, cd = median(training.plain), median(training.cd)
    profiled = training.profiled
    parts = {name: median(rep[name] for rep in profiled.parts) for name in profiled.parts[0]}
    # The parts come from profiled steps, so they are set against profiled steps (the profiler's own
    # cost per recorded op makes those a little slower than the timed steps above them).
    profiled_plain, profiled_cd = median(profiled.plain), median(profiled.cd)
    other = median(step - sum(rep.values()) for step, rep in zip(profiled.cd, profiled.parts))
    mean_counts = {name: statistics.fmean(rep[name] for rep in training.counts) for name in training.counts[0]}
    batch = setup.images.shape[0]
    synced_target = setup.cd_loss.sync_dropout and loss_cd._has_active_dropout(setup.student)
    target_rows = batch if synced_target else mean_counts['general']
    # Network evaluations per sample: forward + backward ~ 3 forwards; no-grad forwards count 1. A guide
    # of the student's size doubles the teacher's evaluations; one of another size is left out.
    solver = setup.cd_loss.teacher_solver
    teacher_evals = loss_cd.TEACHER_EVALUATIONS[solver]
    guide_size = None if setup.guide is None else config.guide_size or config.net_size
    counted_evals = teacher_evals * (2 if guide_size == config.net_size else 1)
    floor = (3 * batch + counted_evals * (batch - mean_counts['terminal']) + target_rows) / (3 * batch)
    floor_note = '' if guide_size in (None, config.net_size) else f', not counting the {guide_size} guide'
    plural = lambda count: 's' if count > 1 else ''
    hop_name = ('teacher ' if setup.guide is None else 'guided teacher ') + SOLVER_NAMES[solver]
    hop_evals = f'{teacher_evals}' if setup.guide is None else f'{teacher_evals}+{teacher_evals}'
    sampler, raw = median(sampling.sampler), median(sampling.raw)
    # Ratios come from the two sides of each rep, timed back to back, so slow drifts of the machine cancel.
    paired_ratio = lambda numerators, denominators: median(a / b for a, b in zip(numerators, denominators))
    cd_ratio, sampler_ratio = paired_ratio(training.cd, training.plain), paired_ratio(sampling.sampler, sampling.raw)
    grids = setup.cd_loss.grids(setup.cd_loss.current_teacher_edges())

    print(f'torch {torch.__version__} on {setup.device.type}: {describe_device(setup.device)}')
    print(f'1/5/15-min load average: {config.load_before} at the start, {load_average()} at the end')
    if setup.device.type == 'cpu' and os.getloadavg()[0] > os.cpu_count():
        print('note: the load exceeds the number of cores, so other processes shared the CPU during these timings')
    print(f'network {config.net_size} ({sum(p.numel() for p in setup.student.parameters()):,} parameters), '
        f'batch {batch}, S={config.S}, T={config.T} (T_eff={grids.T_eff}), dropout {config.dropout}, '
        f'mixed precision {"on" if config.fp16 and setup.device.type == "cuda" else "off"}, '
        f'cuDNN autotuning {"on" if config.cudnn_benchmark else "off"}')
    print(f'teacher solver {solver} ({teacher_evals} teacher evaluation{plural(teacher_evals)} per non-terminal row)')
    if setup.guide is not None:
        print(f'guided teacher, guidance {setup.cd_loss.guidance:g}: guide {guide_size} '
            f'({sum(p.numel() for p in setup.guide.parameters()):,} parameters), {teacher_evals} guide '
            f'evaluation{plural(teacher_evals)} per non-terminal row besides the teacher\'s')
    print(f'medians of {config.reps} reps after {config.warmup} warm-up reps; '
        f'edge classes per batch (mean): ' + ', '.join(f'{k} {v:.2f}' for k, v in mean_counts.items()))
    # The no-grad passes run on a drawn subset of rows, so their batch size changes from step to step
    # (with cuDNN autotuning, each new size is timed once more).
    hop_sizes = {batch - rep['terminal'] for rep in training.counts}
    target_sizes = {batch if synced_target else rep['general'] for rep in training.counts}
    print(f'batch sizes of the no-grad passes over the reps: teacher hop {len(hop_sizes)} distinct '
        f'({min(hop_sizes)}-{max(hop_sizes)}), target pass {len(target_sizes)} distinct '
        f'({min(target_sizes)}-{max(target_sizes)})')
    kind = 'kernel time (CUDA)' if setup.device.type == 'cuda' else 'host wall time'
    print(f'breakdown: named ranges of the real loss in {len(profiled.cd)} profiled CD steps ({kind}); '
        f'% of CD and x plain against profiled steps ({ms(profiled_cd):.2f} ms CD, {ms(profiled_plain):.2f} ms plain)')
    how = ('torch.cuda.set_sync_debug_mode' if setup.device.type == 'cuda'
        else 'CPU: reads of tensor values in the loss and backward, each a wait on a GPU; copies not seen')
    print(f'host syncs per step: plain {syncs["plain"]}, CD {syncs["cd"]} ({how})')
    print()
    rows = [
        ('plain EDM2 step (EDM2Loss fwd + bwd + Adam)', plain, cd, plain),
        ('CD step (EDMConsistencyDistillLoss fwd + bwd + Adam)', cd, cd, plain),
    ] + [(label, seconds, profiled_cd, profiled_plain) for label, seconds in [
        (f'  {hop_name} hop ({hop_evals} eval{plural(teacher_evals)}, non-terminal rows)', parts['teacher']),
        ('  student forward (with grad)', parts['forward']),
        ('  student backward', parts['backward']),
        (f'  target pass (no grad, {"full batch, synced dropout" if synced_target else "general rows"})',
            parts['target']),
        ('  edges, checks, distance, diagnostics (loss arithmetic)', parts['bookkeeping']),
        ('  gradient sanitising + Adam step', parts['optimizer']),
        ('  other (profiled CD step minus the parts above)', other),
    ]] + [('sCD step (SCDLoss: teacher, fwd, JVP, bwd, Adam)', median(training.scd), cd, plain)]
    print(f'{"training step":<58s} {"ms":>10s} {"% of CD":>8s} {"x plain":>8s}')
    for label, seconds, cd_seconds, plain_seconds in rows:
        print(f'{label:<58s} {ms(seconds):10.2f} {100 * seconds / cd_seconds:8.1f} {seconds / plain_seconds:8.2f}')
    print()
    print(f'{"sampling":<58s} {"ms":>10s}')
    print(f'{f"consistency_sampler, S={config.S}":<58s} {ms(sampler):10.2f}')
    print(f'{f"{config.S} raw student evaluations":<58s} {ms(raw):10.2f}')
    print()
    mib = lambda nbytes: nbytes / 2 ** 20
    frozen = [net for net in (setup.teacher, setup.guide) if net is not None]
    resident = dict(plain=resident_bytes(setup.plain_net, setup.plain_opt),
        cd=resident_bytes(setup.student, *frozen, setup.student_opt))
    print(f'{"memory (MiB)":<58s} {"plain":>10s} {"CD":>10s}')
    resident_label = f'resident: weights (+ teacher{", guide" if setup.guide is not None else ""}) and Adam state'
    print(f'{resident_label:<58s} {mib(resident["plain"]):10.1f} {mib(resident["cd"]):10.1f}')
    print(f'{"step peak above resident, " + config.memory_method:<58s} {mib(peaks["plain"]):10.1f} {mib(peaks["cd"]):10.1f}')
    print()
    print('ratios: medians over the reps of the ratio within each rep')
    print(f'CD step / plain step          = {cd_ratio:.3f}  (target <= 2.0; network-evaluation floor for these edges '
        f'{floor:.3f}{floor_note})')
    print(f'sCD step / plain step         = {paired_ratio(training.scd, training.plain):.3f}  (sCD step / CD step '
        f'{paired_ratio(training.scd, training.cd):.3f})')
    print(f'sampler / S raw evaluations   = {sampler_ratio:.3f}  (overhead {100 * (sampler_ratio - 1):+.1f} %, target < 5 %)')
    print(f'peak step memory CD / plain   = {peaks["cd"] / max(peaks["plain"], 1):.3f}')

#----------------------------------------------------------------------------

@click.command()
@click.option('--net-size', help='Network architecture', type=click.Choice(list(NET_SIZES)), default='tiny', show_default=True)
@click.option('--batch', help='Images per training step and per sampler call', metavar='INT', type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--S', 'S', help='Student steps (segments of the sigma axis)', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--T', 'T', help='Teacher edges (fixed, no anneal); must be >= S', metavar='INT', type=click.IntRange(min=1), default=256, show_default=True)
@click.option('--reps', help='Timed repetitions; medians are reported', metavar='INT', type=click.IntRange(min=1), default=20, show_default=True)
@click.option('--warmup', help='Untimed repetitions before the timed ones', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@click.option('--device', help='Device [default: cuda if available, else cpu]', metavar='cpu|cuda[:N]', type=str, default=None)
@click.option('--fp16', help='Run the networks in float16 (CUDA only; CPU stays float32)', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--dropout', help='Dropout probability of all three networks', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=0.0, show_default=True)
@click.option('--cudnn-benchmark', 'cudnn_benchmark', help='Let cuDNN time its kernels for each new input shape, as '
    'train_edm2.py --bench does (CUDA only)', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--seed', help='Seed of weights, batch and the per-step reseed', metavar='INT', type=int, default=0, show_default=True)
@click.option('--teacher_solver', '--teacher-solver', 'teacher_solver', help='Teacher step along an edge (the CD loss option)',
    type=click.Choice(loss_cd.TEACHER_SOLVERS), default='heun', show_default=True)
@click.option('--guidance', help='Guidance weight of the teacher (the CD loss option); 1 = no guide', metavar='FLOAT',
    type=dnnlib.cli.FiniteFloat(), default=1.0, show_default=True)
@click.option('--guide-size', 'guide_size', help='Architecture of the guide, with the teacher\'s resolution and labels '
    '[default: --net-size]', type=click.Choice(list(NET_SIZES)))
def cli(net_size, batch, S, T, reps, warmup, device, fp16, dropout, cudnn_benchmark, seed, teacher_solver, guidance,
        guide_size):
    """Time a CD training step against a plain EDM2 training step, and S-step sampling against S evaluations."""
    device = torch.device(device if device is not None else 'cuda' if torch.cuda.is_available() else 'cpu')
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise click.BadParameter(f'{device} requested, but CUDA is not available', param_hint='--device')
    if device.type not in ('cpu', 'cuda'):
        raise click.BadParameter(f'expected cpu or cuda[:N], got {device}', param_hint='--device')
    if T < S:
        raise click.BadParameter(f'the teacher grid needs at least one edge per student step: T >= S = {S}, got {T}',
            param_hint='--T')
    if guide_size is not None and guidance == 1:
        raise click.BadParameter('a guide has no effect with --guidance=1 (the unguided teacher); give --guidance too',
            param_hint='--guide-size')
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    build_kwargs = dict(net_size=net_size, batch=batch, S=S, T=T, dropout=dropout, fp16=fp16, device=device, seed=seed,
        teacher_solver=teacher_solver, guidance=guidance, guide_size=guide_size)
    config = dnnlib.EasyDict(build_kwargs, reps=reps, warmup=warmup, load_before=load_average(),
        cudnn_benchmark=cudnn_benchmark and device.type == 'cuda')
    if device.type == 'cpu':
        # Before this process builds its own copy, so that only one copy of the networks is in memory.
        peaks = cpu_step_peaks_in_fresh_process(build_kwargs, seed)
        config.memory_method = 'RSS high-water mark'
    setup = build_setup(**build_kwargs)
    progress(f'timing {warmup} + {reps} reps of the plain, CD and sCD steps')
    training = time_training(setup, seed, warmup, reps)
    syncs = host_syncs(setup, seed, 0)
    progress(f'timing {warmup} + {reps} reps of the sampler')
    sampling = time_sampling(setup, S, seed, warmup, reps)
    if device.type == 'cuda':
        progress('measuring step memory')
        peaks = step_peaks(setup, seed, cuda_step_peak)
        config.memory_method = 'max_memory_allocated'
    print_report(setup, config, training, syncs, sampling, peaks)


if __name__ == '__main__':
    cli()

#----------------------------------------------------------------------------
