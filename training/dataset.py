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

class DatasetError(dnnlib.UserError):
    """A dataset that cannot be used as given: a bad path, an unreadable sample, inconsistent shapes or bad labels."""

def is_sample_file(fname):
    """File names the dataset treats as samples."""
    ext = os.path.splitext(fname)[1].lower()
    return ext == '.npy' or ext in PIL.Image.registered_extensions()

#----------------------------------------------------------------------------
# Labels in dataset.json: one class index (an integer >= 0) per sample, or one flat list of numbers per
# sample (a float vector), the same length for all samples.

_INT64_MAX = 2**63 - 1

def _show(value, limit=60):
    """A label as it reads in dataset.json, shortened to `limit` characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + '...'

def _parse_label(label):
    """('class', int), ('vector', float32 array) or (None, why the label is unusable)."""
    if isinstance(label, bool) or label is None:
        return None, f'is {_show(label)}, not a class index (an integer >= 0) or a list of numbers'
    if isinstance(label, (int, float)):
        if isinstance(label, float) and not label.is_integer():
            return None, 'is not an integer; class labels are integers >= 0'
        if label < 0:
            return None, 'is negative; class labels are integers >= 0'
        if label > _INT64_MAX:
            return None, 'is too large for a class index'
        return 'class', int(label)
    if isinstance(label, list):
        if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in label):
            return None, 'is not a flat list of numbers'
        try:
            with np.errstate(over='ignore'):
                vector = np.array(label, dtype=np.float64).astype(np.float32)
        except OverflowError:
            vector = None
        if vector is None or not np.isfinite(vector).all():
            return None, 'holds a value that is not a finite float32 number'
        return 'vector', vector
    kind = {str: 'a string', dict: 'a JSON object'}.get(type(label), f'a {type(label).__name__}')
    return None, f'is {kind}, not a class index (an integer >= 0) or a list of numbers'

def parse_labels(entries, fnames):
    """Check the "labels" list of dataset.json against the sample files `fnames` (sorted).

    Returns (labels, problems): labels are int64 [N] class indices or float32 [N, D] vectors in the
    order of `fnames` (None when there are problems), problems a list of (file name, what is wrong),
    in sample order, with entries that name no sample at the end. Raises DatasetError when `entries`
    is not a list of [path, label] pairs.
    """
    if not isinstance(entries, list):
        raise DatasetError(f'"labels" is {type(entries).__name__}, expected a list of [path, label] pairs or null')
    problems = []
    labels = {}
    for pos, entry in enumerate(entries):
        if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str):
            raise DatasetError(f'entry {pos} of "labels" is {_show(entry)}, expected a [path, label] pair')
        name, label = entry
        if name in labels:
            problems.append((name, 'is listed more than once in dataset.json'))
        labels[name] = label

    first = None # (file name, kind, vector length) of the first usable label
    parsed = []
    for fname in fnames:
        if fname not in labels:
            problems.append((fname, 'has no label in dataset.json'))
            continue
        kind, value = _parse_label(labels[fname])
        shown = _show(labels[fname])
        if kind is None:
            problems.append((fname, f'has the label {shown}, which {value}'))
            continue
        length = len(value) if kind == 'vector' else None
        if first is None:
            first = (fname, kind, length)
        elif kind != first[1]:
            kinds = {'class': 'a class index', 'vector': 'a vector'}
            problems.append((fname, f'has the label {shown}, which is {kinds[kind]}, but {first[0]} has '
                f'{kinds[first[1]]}; all labels must be of one kind'))
            continue
        elif length != first[2]:
            problems.append((fname, f'has a label with {length} values, but {first[0]} has {first[2]}; '
                'vector labels must all have one length'))
            continue
        parsed.append(value)

    known = set(fnames)
    extra = [name for name in labels if name not in known]
    problems += [(name, 'is listed in dataset.json but is not a sample file of the dataset') for name in extra]
    order = {fname: idx for idx, fname in enumerate(fnames)}
    problems.sort(key=lambda problem: order.get(problem[0], len(fnames)))
    if problems:
        return None, problems
    if first[1] == 'class':
        return np.array(parsed, dtype=np.int64), []
    return np.stack(parsed).astype(np.float32).reshape(len(fnames), first[2]), []

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
            raise DatasetError(f'{name}: max_size must be a positive integer or None, got {max_size}')
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
            onehot = np.zeros(self.label_dim, dtype=np.float32)
            onehot[label] = 1
            return onehot
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
            raise DatasetError(f'{self._name}: samples are {width}x{height}, a resolution needs square samples')
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
# The files of a dataset: samples in a directory tree or a ZIP archive, listed in sorted path order,
# and the optional dataset.json at the root: {"labels": [[path, label], ...]} or {"labels": null}.
# Nothing is decoded up front; `dataset_tool.py check` reads every sample through read_sample().

class SampleFolder:
    def __init__(self, path):
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
            except (zipfile.BadZipFile, OSError) as err:
                raise DatasetError(f'Dataset archive {path} is not a valid ZIP file: {err}') from err
        elif os.path.exists(path):
            raise DatasetError(f'Dataset path {path} must be a directory or a .zip file')
        else:
            raise DatasetError(f'Dataset path {path} does not exist')
        self._fnames = sorted(fname for fname in all_fnames if is_sample_file(fname))
        if len(self._fnames) == 0:
            raise DatasetError(f'Dataset {path} contains no PNG/NPY sample files')

    @property
    def path(self):
        return self._path

    @property
    def sample_names(self):
        """The sample files, in the order of the raw indices."""
        return list(self._fnames)

    def _get_zipfile(self):
        if self._zipfile is None:
            self._zipfile = zipfile.ZipFile(self._path)
        return self._zipfile

    def _open_file(self, fname):
        if self._kind == 'dir':
            return open(os.path.join(self._path, fname), 'rb')
        return self._get_zipfile().open(fname, 'r')

    def _has_file(self, fname):
        if self._kind == 'dir':
            return os.path.isfile(os.path.join(self._path, fname))
        return fname in self._get_zipfile().namelist()

    def close(self):
        archive, self._zipfile = self._zipfile, None
        if archive is not None:
            archive.close()

    def __getstate__(self):
        return dict(self.__dict__, _zipfile=None)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @staticmethod
    def _decode(fname, data):
        if fname.lower().endswith('.npy'):
            array = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
            if array.dtype.kind not in 'iuf' or array.ndim < 2 or array.size == 0:
                raise ValueError(f'holds a {array.dtype} array of shape {list(array.shape)}; '
                    'expected numbers with at least 2 dimensions')
            return array.reshape(-1, *array.shape[-2:])
        if pyspng is not None and fname.lower().endswith('.png'):
            image = pyspng.load(data)
        else:
            try:
                with PIL.Image.open(io.BytesIO(data)) as pil_image:
                    pil_image.load() # decode here, so that errors are raised rather than hidden by numpy
                    image = np.array(pil_image)
            except PIL.UnidentifiedImageError:
                raise ValueError('not an image file of a format that PIL reads') from None
        if not isinstance(image, np.ndarray) or image.dtype.kind not in 'iuf' or image.ndim not in (2, 3) or image.size == 0:
            raise ValueError('did not decode to an array of pixels')
        if image.ndim == 2:
            image = image[:, :, np.newaxis]
        return image.transpose(2, 0, 1) # HWC => CHW

    def read_sample(self, raw_idx):
        """Decode sample number raw_idx into a CHW array; DatasetError naming the file if that fails."""
        fname = self._fnames[raw_idx]
        try:
            with self._open_file(fname) as f:
                return self._decode(fname, f.read())
        except Exception as err:
            raise DatasetError(f'Cannot read sample {fname} in dataset {self._path}: {str(err) or type(err).__name__}') from err

    def read_labels(self):
        """dataset.json checked against the samples: (labels, problems) as from parse_labels(), or
        (None, []) without dataset.json or with {"labels": null}. Raises DatasetError when the file
        cannot be read or does not have the dataset.json structure."""
        if not self._has_file('dataset.json'):
            return None, []
        try:
            with self._open_file('dataset.json') as f:
                content = json.load(f)
            if not isinstance(content, dict) or 'labels' not in content:
                raise DatasetError('no "labels" key at the top level')
            if content['labels'] is None:
                return None, []
            return parse_labels(content['labels'], self._fnames)
        except (ValueError, OSError, zipfile.BadZipFile) as err: # DatasetError and json's errors are ValueErrors
            raise DatasetError(f'{self._path}: dataset.json must be {{"labels": [[path, label], ...]}} '
                f'or {{"labels": null}} ({err})') from err

#----------------------------------------------------------------------------
# The training dataset: all samples must have the shape of the first one.

class ImageFolderDataset(SampleFolder, Dataset):
    def __init__(self, path, resolution=None, *, use_labels=True, max_size=None, xflip=False, random_seed=0, cache=False):
        SampleFolder.__init__(self, path)
        name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        first = self.read_sample(0)
        Dataset.__init__(self, name=name, raw_shape=[len(self._fnames)] + list(first.shape), max_size=max_size,
            use_labels=use_labels, xflip=xflip, random_seed=random_seed, cache=cache)
        if resolution is not None and (first.shape[1] != resolution or first.shape[2] != resolution):
            raise DatasetError(f'Dataset {path} has {first.shape[2]}x{first.shape[1]} samples, but resolution={resolution} was requested')
        if use_labels:
            self._get_raw_labels()

    def __getstate__(self):
        return dict(Dataset.__getstate__(self), _zipfile=None)

    def _load_raw_image(self, raw_idx):
        image = self.read_sample(raw_idx)
        if list(image.shape) != self.image_shape:
            raise DatasetError(f'Sample {self._fnames[raw_idx]} in dataset {self._path} has shape {list(image.shape)}, '
                f'but the first sample has shape {self.image_shape}; all samples must have the same shape')
        return image

    def _load_raw_labels(self):
        labels, problems = self.read_labels()
        if problems:
            fname, what = problems[0]
            more = f' ({len(problems)} label problems in all; `dataset_tool.py check` lists them)' if len(problems) > 1 else ''
            raise DatasetError(f'Dataset {self._path}: {fname} {what}{more}')
        return labels

#----------------------------------------------------------------------------
