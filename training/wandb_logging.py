"""Optional Weights & Biases logging of a training run (train_edm2.py --wandb).

The training loop builds one WandbLogger on rank 0 and feeds it what it also writes to the run
directory: the status statistics of stats.jsonl, the rows of metrics-val.jsonl and the sample grid
of each validation. The W&B step is the number of training images seen (cur_nimg), the same count
that names snapshots and training states, so it only grows, also across resumed sessions.

The W&B run belongs to the run directory: its id is kept in RUN_DIR/wandb-run-id.txt, and every
later session of the run (a rerun of the same command) continues that W&B run. W&B's own files go
to RUN_DIR/wandb/; offline runs (mode='offline') can be uploaded later with `wandb sync`.

The wandb package is imported only when a logger is built, so it is needed only with --wandb.
"""

import math
import os
import secrets
import string

import numpy as np

import dnnlib
import generate_images
from torch_utils import distributed as dist

RUN_ID_FILE = 'wandb-run-id.txt'
MODES = ('online', 'offline', 'disabled')

#----------------------------------------------------------------------------

def import_wandb():
    """The wandb module, or a UserError that says how to get it."""
    try:
        import wandb  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise dnnlib.UserError(f'--wandb needs the wandb package, which cannot be imported ({err}): '
            'pip install wandb, or train without --wandb') from None
    return wandb


def read_run_id(run_dir):
    """The W&B run id recorded in run_dir, or None for a run that has not used W&B yet."""
    path = os.path.join(run_dir, RUN_ID_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        run_id = f.read().strip()
    return run_id or None


def new_run_id(length=12):
    """A random run id of lowercase letters and digits (the characters W&B uses for its own ids)."""
    alphabet = string.ascii_lowercase + string.digits
    return ''.join(secrets.choice(alphabet) for _ in range(length))


def baseline_key(row, metric):
    """History key of a baseline row, e.g. 'baseline/teacher_heun63/fid'."""
    return f'baseline/{row["network"]}_{row["sampler"]}{row["nfe"]}/{metric}'

#----------------------------------------------------------------------------

class WandbLogger:
    """Sends a training run's statistics, validation results and sample grids to W&B.

    project, entity, name, tags: where the run goes and what it is called (name None: the name of
                 the run directory; entity None: the account's default entity).
    mode:        'online', 'offline' or 'disabled'; None leaves it to W&B ($WANDB_MODE, else online).
    run_dir:     the training run directory; the W&B run id and W&B's files are kept there.
    options:     the training_loop arguments, stored as the W&B run's config.
    """

    def __init__(self, run_dir, options=None, project='mscd-edm2', entity=None, name=None, tags=None, mode=None):
        if mode is not None and mode not in MODES:
            raise dnnlib.UserError(f'W&B mode {mode!r}: expected one of {", ".join(MODES)}', option='mode')
        wandb = import_wandb()
        self._wandb = wandb
        self.run_dir = run_dir
        run_id = read_run_id(run_dir)
        if run_id is None:
            # Recorded before the run starts, so that even a session killed during wandb.init() resumes it.
            run_id = new_run_id()
            dist.write_file_atomically(os.path.join(run_dir, RUN_ID_FILE), lambda f: f.write(f'{run_id}\n'.encode()))
        self.run_id = run_id
        self.run = wandb.init(
            project=project, entity=entity, name=name or os.path.basename(os.path.abspath(run_dir)),
            tags=list(tags) if tags else None, mode=mode, dir=os.path.abspath(run_dir),
            id=run_id, resume='allow', config=dict(options or {}), allow_val_change=True)
        # A resumed online run continues after the last step the server holds. A session killed after
        # its last training state had logged steps past it, which this session logs again with the
        # same values; W&B would drop them with a warning, so they are skipped here.
        self.min_step = int(getattr(self.run, 'starting_step', 0) or 0)

    #------------------------------------------------------------------------

    def _log(self, cur_nimg, data):
        step = int(cur_nimg)
        if not data or step < self.min_step:
            return
        self.run.log(data, step=step)
        self.min_step = step

    def log_stats(self, cur_nimg, stats):
        """Log {statistic name: mean} of a status line; NaN and Inf values (no samples) are left out."""
        data = {}
        for name, value in stats.items():
            if value is None:
                continue
            value = float(value)
            if math.isfinite(value):
                data[name] = value
        self._log(cur_nimg, data)

    def log_validation(self, cur_nimg, rows, grid=None):
        """Log one validation: the rows written to metrics-val.jsonl and the uint8 NCHW sample grid.

        The trained network's values go to 'val/<metric>' (and the best so far to the run summary as
        'val/<metric>_best'), each baseline to 'baseline/<network>_<sampler><nfe>/<metric>'.
        """
        data = {}
        caption = None
        for row in rows:
            value = row.get('value')
            if value is None or not math.isfinite(float(value)):
                continue
            metric = row['metric']
            if row.get('network') == 'trained':
                data[f'val/{metric}'] = float(value)
                if row.get('best'):
                    self.run.summary[f'val/{metric}_best'] = float(value)
                    self.run.summary[f'val/{metric}_best_snapshot'] = row.get('snapshot')
                caption = (f'{row.get("snapshot")}: {row.get("sampler")}, {row.get("steps")} steps '
                    f'({row.get("nfe")} NFE), {cur_nimg / 1e3:g} kimg')
            else:
                data[baseline_key(row, metric)] = float(value)
        if grid is not None and len(grid):
            data['val/samples'] = self._image(grid, caption)
        self._log(cur_nimg, data)

    def _image(self, grid, caption):
        images = grid.detach().cpu().numpy() if hasattr(grid, 'detach') else np.asarray(grid)
        mosaic = generate_images.image_grid(images.astype(np.uint8)).transpose(1, 2, 0)  # HWC
        if mosaic.shape[2] == 1:
            mosaic = mosaic[:, :, 0]
        return self._wandb.Image(mosaic, caption=caption)

    def finish(self):
        """End the W&B run (uploading what is left); the logger cannot be used afterwards."""
        if self.run is not None:
            self.run.finish()
            self.run = None

#----------------------------------------------------------------------------
