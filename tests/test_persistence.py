"""Tests for torch_utils.persistence: EDM2-format (version 6) self-contained pickles."""

import copy
import importlib.util
import io
import os
import pickle
import sys
import textwrap
import uuid

import numpy as np
import pytest
import torch

import dnnlib
from helpers import run_script
from torch_utils import persistence

TOY_SOURCE = textwrap.dedent('''
    import numpy as np
    import psutil
    import torch
    import dnnlib
    from torch_utils import distributed as dist
    from torch_utils import misc
    from torch_utils import persistence
    from torch_utils import training_stats

    @persistence.persistent_class
    class Affine(torch.nn.Module):
        def __init__(self, channels, offset=0.5):
            super().__init__()
            self.offset = offset
            self.weight = torch.nn.Parameter(torch.randn(channels))
            self.register_buffer('counter', torch.zeros([]))

        def forward(self, x):
            shift = misc.const_like(x, np.full([len(self.weight)], self.offset))
            return x * self.weight + shift

    @persistence.persistent_class
    class Quiet:
        def __init__(self, value):
            self._record_init_args = False
            self.value = value

    @persistence.persistent_class
    class Holder:
        def __init__(self, payload):
            self.payload = payload
''')


def _import_toy(tmp_path, source=TOY_SOURCE):
    name = f'toy_{uuid.uuid4().hex}'
    path = tmp_path / f'{name}.py'
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _run_python(code, cwd):
    return run_script('-c', textwrap.dedent(code), cwd=cwd).stdout


def _capture_meta(data):
    """Unpickle while recording the meta dicts handed to the reconstruct function, without running it."""
    metas, globals_used = [], []

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            globals_used.append(f'{module}.{name}')
            if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
                return lambda meta: metas.append(meta) or meta
            return super().find_class(module, name)

    top = Recorder(io.BytesIO(data)).load()
    return top, metas, globals_used

#----------------------------------------------------------------------------


def test_decorated_class_keeps_identity_and_records_init_args(tmp_path):
    toy = _import_toy(tmp_path)
    net = toy.Affine(3, offset=0.25)
    assert type(net).__name__ == 'Affine' and type(net).__module__ == toy.__name__
    assert isinstance(net, torch.nn.Module)
    assert persistence.is_persistent(toy.Affine) and persistence.is_persistent(net)
    assert not persistence.is_persistent(torch.nn.Linear(2, 2))
    assert net.init_args == (3,)
    assert net.init_kwargs == {'offset': 0.25} and isinstance(net.init_kwargs, dnnlib.EasyDict)
    assert persistence.persistent_class(toy.Affine) is toy.Affine
    quiet = toy.Quiet(7)
    assert quiet.init_args is None and quiet.init_kwargs is None


def test_pickle_format_matches_edm2(tmp_path):
    toy = _import_toy(tmp_path)
    net = toy.Affine(2)
    data = pickle.dumps(dnnlib.EasyDict(ema=net))
    top, metas, globals_used = _capture_meta(data)
    assert type(top) is dnnlib.EasyDict and list(top.keys()) == ['ema']
    assert 'torch_utils.persistence._reconstruct_persistent_obj' in globals_used
    assert 'dnnlib.util.EasyDict' in globals_used
    assert not any(toy.__name__ in g for g in globals_used)
    (meta,) = metas
    assert type(meta) is dict
    assert list(meta.keys()) == ['type', 'version', 'module_src', 'class_name', 'state']
    assert meta['type'] == 'class' and meta['version'] == 6 and meta['class_name'] == 'Affine'
    assert meta['module_src'] == TOY_SOURCE
    state = meta['state']
    assert state['offset'] == 0.5 and state['_init_args'] == (2,) and state['_init_kwargs'] == {}
    assert torch.equal(state['_parameters']['weight'], net.weight.detach())
    assert 'counter' in state['_buffers']


def test_round_trip_in_fresh_process(tmp_path):
    toy = _import_toy(tmp_path)
    torch.manual_seed(1)
    net = toy.Affine(4, offset=-1.0)
    x = torch.arange(8.0).reshape(2, 4)
    with open(tmp_path / 'net.pkl', 'wb') as f:
        pickle.dump(dnnlib.EasyDict(ema=net, x=x, y=net(x).detach()), f)
    os.remove(toy.__file__) # the reader must not depend on the writer's module file

    out = _run_python(f'''
        import pickle, sys, torch
        with open('net.pkl', 'rb') as f:
            data = pickle.load(f)
        net = data.ema
        assert type(net).__name__ == 'Affine', type(net)
        assert type(net).__module__.startswith('_imported_module_'), type(net).__module__
        assert {toy.__name__!r} not in sys.modules
        assert net.init_kwargs.offset == -1.0
        assert torch.equal(net(data.x), data.y)
        print('loaded-ok')
    ''', cwd=tmp_path)
    assert out.strip() == 'loaded-ok'


def _edm2_style_pickle(module_src, state):
    """Pickle bytes laid out as EDM2 writes them, built without persistent_class."""
    meta = dict(type='class', version=6, module_src=module_src, class_name='Affine', state=state)

    class Raw:
        def __reduce__(self):
            return (persistence._reconstruct_persistent_obj, (meta,))

    return pickle.dumps(dnnlib.util.EasyDict(ema=Raw()))


def test_loads_pickle_written_in_edm2_format(tmp_path):
    template = torch.nn.Module() # plain module: its __dict__ is exactly what EDM2 stores as state
    template.offset = 2.0
    template.weight = torch.nn.Parameter(torch.tensor([1.0, -3.0]))
    template.register_buffer('counter', torch.zeros([]))
    template._init_args = (2,)
    template._init_kwargs = {'offset': 2.0}
    state = template.__dict__.copy()
    (tmp_path / 'edm2.pkl').write_bytes(_edm2_style_pickle(TOY_SOURCE, state))

    # Only the repo is importable: the embedded source must resolve torch_utils and dnnlib on its own.
    out = _run_python('''
        import pickle, torch
        with open('edm2.pkl', 'rb') as f:
            net = pickle.load(f)['ema']
        y = net(torch.tensor([[10.0, 10.0]]))
        print(y.tolist(), net.init_kwargs.offset, net.counter.item())
    ''', cwd=tmp_path)
    assert out.split() == ['[[12.0,', '-28.0]]', '2.0', '0.0']


def test_identical_source_is_executed_once(tmp_path):
    toy = _import_toy(tmp_path)
    data = pickle.dumps([toy.Affine(2), toy.Affine(3)])
    first, second = pickle.loads(data)
    third = pickle.loads(data)[0]
    assert type(first) is type(second) is type(third)
    assert type(first) is not toy.Affine


def test_deepcopy_uses_persistent_path(tmp_path):
    toy = _import_toy(tmp_path)
    net = toy.Affine(3)
    clone = copy.deepcopy(net)
    assert persistence.is_persistent(clone) and type(clone).__name__ == 'Affine'
    x = torch.randn(5, 3)
    assert torch.equal(clone(x), net(x))
    clone.weight.data.zero_()
    assert net.weight.abs().sum() > 0


def test_persistent_objects_nest(tmp_path):
    toy = _import_toy(tmp_path)
    holder = toy.Holder({'net': toy.Affine(2), 'array': np.arange(3)})
    loaded = pickle.loads(pickle.dumps(holder))
    assert type(loaded).__name__ == 'Holder'
    assert type(loaded.payload['net']).__name__ == 'Affine'
    assert np.array_equal(loaded.payload['array'], np.arange(3))


def test_unpicklable_state_is_rejected_at_construction(tmp_path):
    toy = _import_toy(tmp_path)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        toy.Holder(lambda: None)


def test_import_hook_can_patch_source(tmp_path):
    toy = _import_toy(tmp_path)
    data = pickle.dumps(toy.Affine(2, offset=0.0))
    calls = []

    def patch(meta):
        calls.append(meta.class_name)
        meta.module_src = meta.module_src.replace('x * self.weight + shift', 'x * 0 + 42')
        return meta

    persistence.import_hook(patch)
    try:
        net = pickle.loads(data)
    finally:
        persistence._import_hooks.remove(patch)
    assert calls == ['Affine']
    assert torch.equal(net(torch.ones(1, 2)), torch.full([1, 2], 42.0))
    with pytest.raises(TypeError):
        persistence.import_hook('not callable')


def test_unknown_version_is_refused():
    meta = dict(type='class', version=5, module_src=TOY_SOURCE, class_name='Affine', state={})
    with pytest.raises(RuntimeError, match='version 5'):
        persistence._reconstruct_persistent_obj(meta)


def test_missing_class_is_reported():
    meta = dict(type='class', version=6, module_src=TOY_SOURCE, class_name='Nowhere', state={})
    with pytest.raises(RuntimeError, match="'Nowhere'"):
        persistence._reconstruct_persistent_obj(meta)
