"""Training datasets: images (PNG) or VAE latents (NPY) in a ZIP archive or a directory tree."""

import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import torch

import dnnlib

try:
    import pyspng
except ImportError:
    pyspng = None

#----------------------------------------------------------------------------
# File names the dataset treats as samples.

def is_sample_file(fname):
    ext = os.path.splitext(fname)[1].lower()
    return ext == '.npy' or ext in PIL.Image.registered_extensions()

#----------------------------------------------------------------------------
# Generic part: index selection, x-flips, labels and the EDM2 properties.
# Subclasses provide the raw samples through _load_raw_image / _load_raw_labels.

class Dataset(torch.utils.data.Dataset):
    def __init__(self, name, raw_shape, use_labels=True, max_size=None, xflip=False, random_seed=0, cache=False):
        self._name = name
        self._raw_shape = list(raw_shape)
        self._use_labels = use_labels
        self._raw_labels = None # loaded on first use
        self._label_shape = None
        self._cache = cache
        self._cached_images = dict() # raw index => decoded image, filled only when cache=True

        num_raw = self._raw_shape[0]
        if max_size is not None and max_size < 1:
            raise ValueError(f'{name}: max_size must be a positive integer or None, got {max_size}')
        self._raw_idx = np.arange(num_raw, dtype=np.int64)
        if max_size is not None and num_raw > max_size:
            order = self._raw_idx.copy()
            np.random.RandomState(random_seed % (1 << 31)).shuffle(order)
            self._raw_idx = np.sort(order[:max_size])

        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.concatenate([self._raw_idx, self._raw_idx])
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    def _load_raw_image(self, raw_idx):
        """Sample number raw_idx as a CHW numpy array."""
        raise NotImplementedError

    def _load_raw_labels(self):
        """int64 [N] class indices, float32 [N, D] vectors, or None when unlabelled."""
        raise NotImplementedError

    def _get_raw_labels(self):
        if self._raw_labels is None:
            if self._use_labels:
                labels = self._load_raw_labels()
            else:
                labels = None
            if labels is None:
                labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
            self._raw_labels = labels
        return self._raw_labels

    def __getstate__(self):
        return dict(self.__dict__, _raw_labels=None)

    def __len__(self):
        return self._raw_idx.size

    def __getitem__(self, idx):
        raw_idx = int(self._raw_idx[idx])
        image = self._cached_images.get(raw_idx)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache:
                self._cached_images[raw_idx] = image
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def get_label(self, idx):
        label = self._get_raw_labels()[self._raw_idx[idx]]
        if self.has_onehot_labels:
            return np.eye(self.label_dim, dtype=np.float32)[label]
        return label.copy()

    def get_details(self, idx):
        raw_idx = int(self._raw_idx[idx])
        return dnnlib.EasyDict(raw_idx=raw_idx, xflip=bool(self._xflip[idx]), raw_label=self._get_raw_labels()[raw_idx].copy())

    @property
    def name(self):
        return self._name

    @property
    def image_shape(self): # [channels, height, width]
        return list(self._raw_shape[1:])

    @property
    def num_channels(self):
        return self.image_shape[0]

    @property
    def resolution(self):
        channels, height, width = self.image_shape
        if height != width:
            raise ValueError(f'{self._name}: samples are {width}x{height}, a resolution needs square samples')
        return height

    @property
    def label_shape(self):
        if self._label_shape is None:
            labels = self._get_raw_labels()
            if labels.dtype == np.int64:
                self._label_shape = [int(labels.max()) + 1]
            else:
                self._label_shape = list(labels.shape[1:])
        return list(self._label_shape)

    @property
    def label_dim(self):
        return int(np.prod(self.label_shape))

    @property
    def has_labels(self):
        return self.label_dim != 0

    @property
    def has_onehot_labels(self):
        return self._get_raw_labels().dtype == np.int64

#----------------------------------------------------------------------------
# Samples read from a directory tree or a ZIP archive, listed in sorted path order.
# Optional dataset.json at the root: {"labels": [[path, label], ...]} or {"labels": null}.

class ImageFolderDataset(Dataset):
    def __init__(self, path, resolution=None, *, use_labels=True, max_size=None, xflip=False, random_seed=0, cache=False):
        self._path = path
        self._zipfile = None
        if os.path.isdir(path):
            self._kind = 'dir'
            all_fnames = [os.path.relpath(os.path.join(root, fname), path).replace(os.sep, '/')
                for root, _dirs, fnames in os.walk(path) for fname in fnames]
        elif os.path.isfile(path) and path.lower().endswith('.zip'):
            self._kind = 'zip'
            try:
                all_fnames = self._get_zipfile().namelist()
            except zipfile.BadZipFile as err:
                raise ValueError(f'Dataset archive {path} is not a valid ZIP file: {err}') from err
        elif os.path.exists(path):
            raise ValueError(f'Dataset path {path} must be a directory or a .zip file')
        else:
            raise FileNotFoundError(f'Dataset path {path} does not exist')

        self._fnames = sorted(fname for fname in all_fnames if is_sample_file(fname))
        if len(self._fnames) == 0:
            raise ValueError(f'Dataset {path} contains no PNG/NPY sample files')

        name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        first = self._read_sample(0)
        super().__init__(name=name, raw_shape=[len(self._fnames)] + list(first.shape), max_size=max_size,
            use_labels=use_labels, xflip=xflip, random_seed=random_seed, cache=cache)
        if resolution is not None and (first.shape[1] != resolution or first.shape[2] != resolution):
            raise ValueError(f'Dataset {path} has {first.shape[2]}x{first.shape[1]} samples, but resolution={resolution} was requested')
        if use_labels:
            self._get_raw_labels()

    def _get_zipfile(self):
        if self._zipfile is None:
            self._zipfile = zipfile.ZipFile(self._path)
        return self._zipfile

    def _open_file(self, fname):
        if self._kind == 'dir':
            return open(os.path.join(self._path, fname), 'rb')
        return self._get_zipfile().open(fname, 'r')

    def close(self):
        archive, self._zipfile = self._zipfile, None
        if archive is not None:
            archive.close()

    def __getstate__(self):
        return dict(super().__getstate__(), _zipfile=None)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _decode(self, fname, data):
        if fname.lower().endswith('.npy'):
            array = np.load(io.BytesIO(data), allow_pickle=False)
            return array.reshape(-1, *array.shape[-2:])
        if pyspng is not None and fname.lower().endswith('.png'):
            image = pyspng.load(data)
        else:
            with PIL.Image.open(io.BytesIO(data)) as pil_image:
                image = np.array(pil_image)
        if image.ndim == 2:
            image = image[:, :, np.newaxis]
        return image.transpose(2, 0, 1) # HWC => CHW

    def _read_sample(self, raw_idx):
        fname = self._fnames[raw_idx]
        try:
            with self._open_file(fname) as f:
                return self._decode(fname, f.read())
        except Exception as err:
            raise ValueError(f'Cannot read sample {fname} in dataset {self._path}: {err}') from err

    def _load_raw_image(self, raw_idx):
        image = self._read_sample(raw_idx)
        if list(image.shape) != self.image_shape:
            raise ValueError(f'Sample {self._fnames[raw_idx]} in dataset {self._path} has shape {list(image.shape)}, '
                f'but the first sample has shape {self.image_shape}; all samples must have the same shape')
        return image

    def _load_raw_labels(self):
        if not self._has_file('dataset.json'):
            return None
        try:
            with self._open_file('dataset.json') as f:
                labels = json.load(f)['labels']
            if labels is None:
                return None
            labels = {fname: label for fname, label in labels}
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f'{self._path}: dataset.json must be {{"labels": [[path, label], ...]}} or {{"labels": null}} ({err})') from err
        unlabelled = [fname for fname in self._fnames if fname not in labels]
        if unlabelled:
            raise ValueError(f'{self._path}: dataset.json has no label for {unlabelled[0]} ({len(unlabelled)} samples unlabelled)')
        missing = sorted(set(labels) - set(self._fnames))
        if missing:
            raise ValueError(f'{self._path}: dataset.json names {missing[0]}, which is not a sample in the dataset ({len(missing)} such entries)')
        labels = np.array([labels[fname] for fname in self._fnames])
        if labels.ndim == 1:
            return labels.astype(np.int64)
        if labels.ndim == 2:
            return labels.astype(np.float32)
        raise ValueError(f'{self._path}: dataset.json labels must be integers or flat lists of numbers')

    def _has_file(self, fname):
        if self._kind == 'dir':
            return os.path.isfile(os.path.join(self._path, fname))
        return fname in self._get_zipfile().namelist()

#----------------------------------------------------------------------------
