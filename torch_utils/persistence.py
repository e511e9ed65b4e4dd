"""Self-contained pickles: persistent classes carry the source code of their defining module.

A class decorated with @persistent_class pickles its instances as a call to
_reconstruct_persistent_obj(meta), where meta holds the module's full source text, the class
name and the instance state. Loading executes that source in a fresh module, so a pickle can be
opened without the original code on sys.path. The format (version 6) matches EDM2's network pickles.
"""

import copy
import inspect
import io
import pickle
import sys
import types
import uuid

import numpy as np
import torch

import dnnlib

#----------------------------------------------------------------------------

_FORMAT_VERSION = 6
_EXEC_MODULE_PREFIX = '_imported_module_'

_persistent_classes = set()     # every class produced by persistent_class()
_import_hooks = []              # callables applied to meta before reconstruction
_source_by_module = dict()      # module object -> its source text
_module_by_source = dict()      # source text -> module executed from it

#----------------------------------------------------------------------------


def persistent_class(orig_class):
    """Class decorator: make instances pickle together with the source of the defining module.

    The returned class subclasses `orig_class` under the same name. Each instance records deep
    copies of its constructor arguments (`init_args`, `init_kwargs`) unless its constructor sets
    `self._record_init_args = False`. Applying the decorator twice is harmless.
    """
    if not isinstance(orig_class, type):
        raise TypeError(f'persistent_class expects a class, got {type(orig_class).__name__}')
    if is_persistent(orig_class):
        return orig_class
    if orig_class.__module__ not in sys.modules:
        raise RuntimeError(f"persistent_class: module '{orig_class.__module__}' of {orig_class.__name__} is not loaded")
    defining_module = sys.modules[orig_class.__module__]
    class_name = orig_class.__name__

    class Persistent(orig_class):
        _orig_module_src = _module_source(defining_module)
        _orig_class_name = class_name

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            keep = getattr(self, '_record_init_args', True)
            self._init_args = copy.deepcopy(args) if keep else None
            self._init_kwargs = copy.deepcopy(kwargs) if keep else None
            if defining_module.__dict__.get(class_name) is None:
                raise RuntimeError(f"persistent_class: '{class_name}' must be defined at the top level of its module")
            _assert_picklable(self.__reduce__())

        @property
        def init_args(self):
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            return None if self._init_kwargs is None else dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            base = list(super().__reduce__())
            if base[0] is _reconstruct_persistent_obj:
                return tuple(base)
            state = base[2] if len(base) > 2 else None
            meta = dict(type='class', version=_FORMAT_VERSION, module_src=self._orig_module_src,
                        class_name=self._orig_class_name, state=state)
            return (_reconstruct_persistent_obj, (meta,), None) + tuple(base[3:])

    for attr in ['__module__', '__name__', '__qualname__', '__doc__']:
        setattr(Persistent, attr, getattr(orig_class, attr))
    Persistent.__wrapped__ = orig_class
    _persistent_classes.add(Persistent)
    return Persistent


def is_persistent(obj):
    """True for classes made by persistent_class() and for their instances."""
    if isinstance(obj, type) and obj in _persistent_classes:
        return True
    return type(obj) in _persistent_classes


def import_hook(hook):
    """Register hook(meta) -> meta, called on every persistent object before it is rebuilt.

    meta is an EasyDict with fields type, version, module_src, class_name and state; a hook may
    edit them (for example patch module_src of old pickles) and must return the meta to use.
    """
    if not callable(hook):
        raise TypeError(f'import_hook expects a callable, got {type(hook).__name__}')
    _import_hooks.append(hook)

#----------------------------------------------------------------------------


def _reconstruct_persistent_obj(meta):
    """Unpickling entry point: rebuild one persistent object from its meta dict."""
    meta = dnnlib.EasyDict(meta, state=dnnlib.EasyDict(meta['state'] or {}))
    for hook in _import_hooks:
        meta = hook(meta)
        if meta is None:
            raise RuntimeError(f'Import hook {hook!r} returned None instead of the meta dict')
    if meta.version != _FORMAT_VERSION:
        raise RuntimeError(f'Unsupported persistent object format version {meta.version!r}; expected {_FORMAT_VERSION}')
    if meta.type != 'class':
        raise RuntimeError(f"Unsupported persistent object type {meta.type!r}; expected 'class'")

    module = _module_from_source(meta.module_src)
    if meta.class_name not in module.__dict__:
        raise RuntimeError(f"Pickled source does not define class '{meta.class_name}'")
    cls = persistent_class(module.__dict__[meta.class_name])
    obj = cls.__new__(cls)
    set_state = getattr(obj, '__setstate__', None)
    if callable(set_state):
        set_state(meta.state) # nn.Module also fills in attributes added by newer torch versions
    else:
        obj.__dict__.update(meta.state)
    return obj


def _module_source(module):
    """Source text of a module, also for modules that were created from pickled source."""
    if module not in _source_by_module:
        _source_by_module[module] = inspect.getsource(module)
    return _source_by_module[module]


def _module_from_source(source):
    """Execute source text as a new module; the same text always maps to the same module."""
    module = _module_by_source.get(source)
    if module is None:
        module = types.ModuleType(_EXEC_MODULE_PREFIX + uuid.uuid4().hex)
        # Register before exec: the source applies @persistent_class, which looks the module up.
        sys.modules[module.__name__] = module
        _source_by_module[module] = source
        _module_by_source[source] = module
        exec(source, module.__dict__) # pylint: disable=exec-used
    return module

#----------------------------------------------------------------------------


def _assert_picklable(obj):
    """Fail early if obj cannot be pickled; common leaf types are accepted without serializing."""
    pending = [obj]
    opaque = []
    while pending:
        item = pending.pop()
        if isinstance(item, (type(None), bool, int, float, complex, str, bytes, bytearray, np.ndarray, torch.Tensor)):
            continue
        if isinstance(item, (list, tuple, set, frozenset)):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif is_persistent(item) or item is _reconstruct_persistent_obj:
            continue
        else:
            opaque.append(item)
    if opaque:
        pickle.dump(opaque, io.BytesIO())

#----------------------------------------------------------------------------

#----------------------------------------------------------------------------
# Reading network pickles (EDM2's and ours) with one clear error per way a file can be unusable.

class NetworkPickleError(dnnlib.UserError):
    """A file that cannot be used as a network pickle."""


def load_network_pickle(source, what='network pickle', verbose=False, require_finite=True):
    """Unpickle `source` (path or URL) and return its dict, whose 'ema' (or else 'net') is a torch module.

    `what` names the file in errors (e.g. '--teacher'). With `require_finite` every parameter and
    buffer of that module must be finite; the error names the first one that is not.
    """
    try:
        f = dnnlib.util.open_url(source, verbose=verbose)
    except FileNotFoundError:
        raise NetworkPickleError(f'{what}: {source} does not exist') from None
    except IsADirectoryError:
        raise NetworkPickleError(f'{what}: {source} is a directory, not a network pickle') from None
    except OSError as err:
        raise NetworkPickleError(f'{what}: cannot open {source} ({err})') from None
    try:
        with f:
            if f.read(4) == b'PK\x03\x04':
                raise NetworkPickleError(f'{what}: {source} is a ZIP archive (e.g. a training state or a dataset), '
                    'not a network pickle')
            f.seek(0)
            data = pickle.load(f)
    except NetworkPickleError:
        raise
    except EOFError:
        raise NetworkPickleError(f'{what}: {source} is empty or truncated (the pickle ends early)') from None
    except Exception as err:  # garbage bytes fail in many ways inside the unpickler
        reason = ' '.join(str(err).split())
        raise NetworkPickleError(f'{what}: {source} is not a readable pickle ({type(err).__name__}: {reason})') from None
    net = data.get('ema', data.get('net')) if isinstance(data, dict) else None
    if not isinstance(net, torch.nn.Module):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise NetworkPickleError(f'{what}: {source} is not a network pickle; expected a dict with an "ema" (or "net") '
            f'network, found {found}')
    if require_finite:
        bad = next((name for name, tensor in [*net.named_parameters(), *net.named_buffers()]
            if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
        if bad is not None:
            raise NetworkPickleError(f'{what}: {source} holds non-finite values (NaN or inf) in {bad}')
    return data

#----------------------------------------------------------------------------
