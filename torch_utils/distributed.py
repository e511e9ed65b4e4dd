"""Process-group setup, rank helpers, cluster hooks and training-state checkpoints."""

import atexit
import os
import re
import socket
import time
import uuid

import click
import torch

import dnnlib
from . import training_stats


def _free_tcp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('', 0))
        return sock.getsockname()[1]


def init():
    """Join (or create) the process group and set up cross-rank training statistics.

    Works under torchrun and as a plain single process, for which the rendezvous variables are
    filled in. Uses NCCL when CUDA is available and gloo otherwise.
    """
    if not torch.distributed.is_initialized():
        os.environ.setdefault('MASTER_ADDR', 'localhost')
        os.environ.setdefault('MASTER_PORT', str(_free_tcp_port()))
        os.environ.setdefault('RANK', '0')
        os.environ.setdefault('LOCAL_RANK', '0')
        os.environ.setdefault('WORLD_SIZE', '1')
        use_cuda = torch.cuda.is_available()
        local_rank = int(os.environ['LOCAL_RANK'])
        if use_cuda and local_rank >= torch.cuda.device_count():
            raise click.ClickException(f'process {local_rank} of this node needs CUDA device {local_rank}, but only '
                f'{torch.cuda.device_count()} are visible: start at most that many processes per node (torchrun --nproc_per_node)')
        backend = 'nccl' if use_cuda and os.name != 'nt' else 'gloo'
        init_method = 'env://?use_libuv=False' if os.name == 'nt' else 'env://'
        torch.distributed.init_process_group(backend=backend, init_method=init_method)
        atexit.register(_shutdown_process_group)
        if use_cuda:
            torch.cuda.set_device(local_rank)

    sync_device = None
    if get_world_size() > 1:
        on_nccl = torch.distributed.get_backend() == 'nccl'
        sync_device = torch.device('cuda') if on_nccl else torch.device('cpu')
    training_stats.init_multiprocessing(rank=get_rank(), sync_device=sync_device)


GLOO_EXIT_GRACE_S = 0.5  # seconds a multi-process gloo run waits at exit; see _shutdown_process_group


def _shutdown_process_group():
    """Destroy the process group at exit, while the interpreter is still fully alive.

    A gloo worker thread releases a finished collective's tensors shortly after the collective
    returns, and that needs the GIL; once interpreter shutdown has begun, it aborts the process
    (SIGABRT). Destroying the group joins those threads, except when a DDP wrapper has kept the
    group alive (as torch does): then waiting GLOO_EXIT_GRACE_S lets them finish their last release.
    """
    if not torch.distributed.is_initialized():
        return
    multi_process_gloo = get_world_size() > 1 and torch.distributed.get_backend() == 'gloo'
    torch.distributed.destroy_process_group()
    if multi_process_gloo:
        time.sleep(GLOO_EXIT_GRACE_S)


def get_local_rank():
    """Index of this process among those of its node (torchrun's LOCAL_RANK; 0 for a plain launch)."""
    return int(os.environ.get('LOCAL_RANK', '0'))


def barrier():
    if torch.distributed.is_initialized() and get_world_size() > 1:
        torch.distributed.barrier()


def node_first(fn, *args, **kwargs):
    """Call fn on the first process of every node, then on the others.

    Every process calls this together. A download into a node's cache then happens once per node:
    the later processes find the file cached.
    """
    leader = get_local_rank() == 0
    if not leader:
        barrier()
    try:
        return fn(*args, **kwargs)
    finally:
        if leader:
            barrier()


def check_same_on_all_ranks(value, describe):
    """Raise UserError(describe(values per rank)) unless every rank passed an equal `value`."""
    if get_world_size() == 1:
        return
    values = [None] * get_world_size()
    torch.distributed.all_gather_object(values, value)
    if any(other != values[0] for other in values):
        raise dnnlib.UserError(describe(values))


class RunDirectoryLock:
    """An exclusive lock on a run directory, held until the process ends (the OS releases it even
    after a kill). A second process that asks for it gets a UserError at once."""

    def __init__(self, run_dir):
        self.file = open(os.path.join(run_dir, '.lock'), 'a+')
        try:
            import fcntl  # POSIX only; elsewhere runs go unlocked
        except ImportError:
            return
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or 'another process'
            self.file.close()
            raise dnnlib.UserError(f'{run_dir} is in use by {owner}; wait for it to end, or use another run directory') from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f'process {os.getpid()} on {socket.gethostname()}\n')
        self.file.flush()


def get_rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def get_world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs)


def should_stop():
    """Whether a cluster scheduler asked the job to end now (never, for a plain launch)."""
    return False


def should_suspend():
    """Whether a cluster scheduler asked the job to pause after a checkpoint (never, for a plain launch)."""
    return False


def request_suspend():
    """Ask the cluster scheduler to pause and later resume this job; a plain launch has none."""


def update_progress(cur, total):
    """Tell the cluster scheduler how far the job is (in kimg); a plain launch has none."""


def _export_state(obj):
    if obj is None or isinstance(obj, dict):
        return obj
    if hasattr(obj, 'state_dict'):
        return obj.state_dict()
    if hasattr(obj, '__getstate__'):
        return obj.__getstate__()
    return obj.__dict__


def _import_state(obj, state):
    if obj is None:
        return
    if isinstance(obj, dict):
        obj.clear()
        obj.update(state)
    elif hasattr(obj, 'load_state_dict'):
        obj.load_state_dict(state)
    elif hasattr(obj, '__setstate__'):
        obj.__setstate__(state)
    else:
        obj.__dict__.clear()
        obj.__dict__.update(state or {})  # an attribute-less object exports None


def _fsync_dir(path):
    if os.name == 'nt':
        return  # directories cannot be opened for fsync on Windows
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TEMPORARY_NAME = re.compile(r'\..+\.[0-9a-f]{32}\.tmp')


def remove_stale_temporaries(folder):
    """Delete the temporary files that saves killed midway left in `folder` (no other process may be saving there)."""
    for file_name in (os.listdir(folder) if os.path.isdir(folder) else []):
        if _TEMPORARY_NAME.fullmatch(file_name):
            os.remove(os.path.join(folder, file_name))


def write_file_atomically(path, write_fn):
    """Create or replace the file `path` with what write_fn(f) writes to the binary file object f.

    The data goes to a temporary file in the same folder, is flushed to disk and then renamed over
    `path`, so readers see either the old file or the complete new one; if anything fails, the
    temporary file is removed and the old file is left as it was. The folder must exist.
    """
    # The temp name starts with '.' and ends in '.tmp' (_TEMPORARY_NAME), so checkpoint patterns never match it.
    target_dir = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(target_dir, f'.{os.path.basename(path)}.{uuid.uuid4().hex}.tmp')
    try:
        with open(tmp_path, 'xb') as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    _fsync_dir(target_dir)


CHECKPOINT_PATTERN = r'training-state-(\d+).pt'


def numbered_files(run_dir, pattern=CHECKPOINT_PATTERN):
    """Paths of the files in `run_dir` whose names match `pattern`, ordered by the number it captures."""
    numbered = []
    for file_name in (os.listdir(run_dir) if os.path.isdir(run_dir) else []):
        match = re.fullmatch(pattern, file_name)
        if match:
            numbered.append((int(match.group(1)), file_name))
    return [os.path.join(run_dir, file_name) for _number, file_name in sorted(numbered)]


def remove_old_checkpoints(run_dir, keep, pattern=CHECKPOINT_PATTERN):
    """Delete all but the newest `keep` training states in `run_dir`."""
    for path in numbered_files(run_dir, pattern)[:-keep]:
        os.remove(path)


class CheckpointIO:
    """Saves and restores the state of named objects (modules, optimizers, dicts, plain objects).

    An object contributes its state_dict(), else __getstate__(), else __dict__; a dict is stored
    as is and None stores nothing. Saving is done by rank 0 and is atomic: a crash mid-save leaves
    any earlier file at that path untouched.
    """

    def __init__(self, **state_objs):
        self._state_objs = state_objs

    def save(self, pt_path, verbose=True):
        if verbose:
            print0(f'Saving {pt_path} ... ', end='', flush=True)
        if get_rank() == 0:
            data = {name: _export_state(obj) for name, obj in self._state_objs.items()}
            write_file_atomically(pt_path, lambda f: torch.save(data, f))
        if verbose:
            print0('done')

    def load(self, pt_path, verbose=True):
        self._import(pt_path, self._read(pt_path), verbose)

    @staticmethod
    def _read(pt_path):
        # weights_only=False: checkpoints hold EasyDicts and other plain Python objects.
        return torch.load(pt_path, map_location=torch.device('cpu'), weights_only=False)

    def _import(self, pt_path, data, verbose):
        if verbose:
            print0(f'Loading {pt_path} ... ', end='', flush=True)
        missing = [name for name in self._state_objs if not isinstance(data, dict) or name not in data]
        if missing:
            raise dnnlib.UserError(f'{pt_path} is not a training state of this kind of run: it has no entry for {missing}')
        for name, obj in self._state_objs.items():
            _import_state(obj, data[name])
        if verbose:
            print0('done')

    def load_latest(self, run_dir, pattern=CHECKPOINT_PATTERN, verbose=True):
        """Load the newest readable file in `run_dir` whose name matches `pattern`; return its path or None.

        An unreadable file (truncated, corrupt) is renamed to <name>.corrupt with a warning, and the
        next older one is tried; when files exist but none can be read, raises UserError.
        """
        numbered = numbered_files(run_dir, pattern)
        for pt_path in reversed(numbered):
            try:
                data = self._read(pt_path)
            except (dnnlib.UserError, OSError):
                raise
            except Exception as err:  # torch.load fails in many ways on a damaged zip or pickle
                print0(f'Warning: cannot read {pt_path} ({type(err).__name__}: {err}); renaming it to '
                    f'{os.path.basename(pt_path)}.corrupt and trying the previous training state')
                barrier()
                if get_rank() == 0:
                    os.replace(pt_path, pt_path + '.corrupt')
                continue
            self._import(pt_path, data, verbose)
            return pt_path
        if numbered:
            raise dnnlib.UserError(f'None of the {len(numbered)} training states in {run_dir} can be read (see the '
                'warnings above); move the run directory aside to start afresh')
        return None

