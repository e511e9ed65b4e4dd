"""Tests for dnnlib: EasyDict, Logger, cache paths, name lookup, time formatting and open_url."""

import collections
import copy
import hashlib
import http.server
import io
import os
import pickle
import socket
import stat
import sys
import tempfile
import threading
import time
import types

import numpy as np
import pytest

import dnnlib
from dnnlib import util


def test_easydict_attribute_access():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d == {'a': 1, 'b': 2} and d.a == 1 and d['b'] == 2
    del d.a
    assert 'a' not in d
    with pytest.raises(AttributeError):
        _ = d.missing
    with pytest.raises(AttributeError):
        del d.missing
    assert not hasattr(d, 'missing')
    nested = dnnlib.EasyDict(inner=dnnlib.EasyDict(x=[1, 2]))
    for clone in [pickle.loads(pickle.dumps(nested)), copy.deepcopy(nested)]:
        assert type(clone) is dnnlib.EasyDict and type(clone.inner) is dnnlib.EasyDict
        assert clone == nested and clone.inner.x is not nested.inner.x
    assert dnnlib.EasyDict is util.EasyDict and dnnlib.make_cache_dir_path is util.make_cache_dir_path


@pytest.mark.parametrize('seconds, full, brief', [
    (0, '0s', '0s'),
    (59.4, '59s', '59s'),
    (59.6, '1m 00s', '1m 00s'),
    (125, '2m 05s', '2m 05s'),
    (3599, '59m 59s', '59m 59s'),
    (3600, '1h 00m 00s', '1h 00m'),
    (3 * 3600 + 4 * 60 + 5, '3h 04m 05s', '3h 04m'),
    (86399, '23h 59m 59s', '23h 59m'),
    (2 * 86400 + 3 * 3600 + 7 * 60 + 9, '2d 03h 07m', '2d 03h'),
])
def test_format_time(seconds, full, brief):
    assert util.format_time(seconds) == full
    assert util.format_time_brief(seconds) == brief


def test_small_helpers():
    assert util.tuple_product((2, 3, 4)) == 24 and util.tuple_product(()) == 1
    dtype, ctype = util.get_dtype_and_ctype('float32')
    assert dtype == np.float32 and ctype.__name__ == 'c_float'
    assert util.get_dtype_and_ctype(np.uint8)[0] == np.uint8
    assert util.get_dtype_and_ctype(np.dtype('int64'))[0] == np.int64
    with pytest.raises(ValueError, match='complex64'):
        util.get_dtype_and_ctype('complex64')
    assert util.is_pickleable([1, 'a']) and not util.is_pickleable(lambda: 0)


def test_name_lookup():
    assert util.construct_class_by_name(a=1, class_name='collections.OrderedDict') == {'a': 1}
    assert type(util.construct_class_by_name(class_name='collections.OrderedDict')) is collections.OrderedDict
    assert util.construct_class_by_name([('k', 2)], class_name=dnnlib.EasyDict).k == 2
    assert util.call_func_by_name(3, 4, func_name='np.add') == 7
    assert util.call_func_by_name([1, 2], func_name=len) == 2
    assert util.get_obj_by_name('os.path.join') is os.path.join
    assert util.get_obj_by_name('dnnlib.util.EasyDict') is dnnlib.EasyDict
    module, local = util.get_module_from_obj_name('dnnlib.util.EasyDict')
    assert module is util and local == 'EasyDict'
    module, local = util.get_module_from_obj_name('collections.OrderedDict.fromkeys')
    assert module is collections and local == 'OrderedDict.fromkeys'
    assert util.get_obj_from_module(collections, '') is collections
    assert util.get_module_dir_by_obj_name('dnnlib.util.format_time') == os.path.dirname(util.__file__)
    with pytest.raises(ImportError, match='no_such_package.thing'):
        util.get_obj_by_name('no_such_package.thing')
    with pytest.raises(ImportError, match='collections.NoSuchClass'):
        util.construct_class_by_name(class_name='collections.NoSuchClass')
    with pytest.raises(TypeError, match='not a callable'):
        util.call_func_by_name(func_name='os.sep')
    with pytest.raises(ValueError):
        util.construct_class_by_name()


def test_name_lookup_reports_broken_dependency(tmp_path, monkeypatch):
    (tmp_path / 'needs_missing_dep.py').write_text('import package_that_is_not_installed\nvalue = 1\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match='package_that_is_not_installed'):
        util.get_obj_by_name('needs_missing_dep.value')


def test_top_level_function_names():
    assert util.is_top_level_function(util.format_time)
    assert not util.is_top_level_function(lambda: 0)
    assert util.get_top_level_function_name(util.format_time) == 'dnnlib.util.format_time'
    with pytest.raises(ValueError):
        util.get_top_level_function_name(dnnlib.EasyDict().get)


def test_directory_listing_and_copy(tmp_path):
    src = tmp_path / 'src'
    (src / 'sub').mkdir(parents=True)
    (src / '__pycache__').mkdir()
    for rel in ['a.py', 'b.pyc', 'sub/c.txt', '__pycache__/d.py']:
        (src / rel).write_text(rel)
    pairs = util.list_dir_recursively_with_ignore(str(src), ignores=['__pycache__', '*.pyc'])
    assert sorted(rel for _, rel in pairs) == ['a.py', os.path.join('sub', 'c.txt')]
    with_base = util.list_dir_recursively_with_ignore(str(src), ignores=['*.pyc', '__pycache__'], add_base_to_relative=True)
    assert sorted(rel for _, rel in with_base) == [os.path.join('src', 'a.py'), os.path.join('src', 'sub', 'c.txt')]
    util.copy_files_and_create_dirs([(a, str(tmp_path / 'dst' / rel)) for a, rel in pairs])
    assert (tmp_path / 'dst' / 'sub' / 'c.txt').read_text() == 'sub/c.txt'


def test_logger_tees_output(tmp_path, capsys):
    log_path = tmp_path / 'log.txt'
    before = sys.stdout, sys.stderr
    with util.Logger(file_name=str(log_path)) as logger:
        assert sys.stdout is logger and sys.stderr is logger
        print('hello')
        print('oops', file=sys.stderr)
        logger.write('')
        logger.write(b'bytes\n')
    assert (sys.stdout, sys.stderr) == before
    assert log_path.read_text() == 'hello\noops\nbytes\n'
    assert capsys.readouterr().out == 'hello\noops\nbytes\n'
    with util.Logger(file_name=str(log_path), file_mode='a'):
        print('more')
    assert log_path.read_text().endswith('bytes\nmore\n')


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'env'))
    assert dnnlib.make_cache_dir_path('downloads', 'x') == os.path.join(str(tmp_path / 'env'), 'downloads', 'x')
    util.set_cache_dir(str(tmp_path / 'explicit'))
    try:
        assert dnnlib.make_cache_dir_path('diffusers') == os.path.join(str(tmp_path / 'explicit'), 'diffusers')
    finally:
        util.set_cache_dir(None)
    monkeypatch.delenv('DNNLIB_CACHE_DIR')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert dnnlib.make_cache_dir_path() == os.path.join(str(tmp_path / 'home'), '.cache', 'dnnlib')


posix_only = pytest.mark.skipif(os.name != 'posix', reason='POSIX ownership and permission bits')


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@posix_only
def test_cache_folders_are_created_private(tmp_path, monkeypatch):
    root = tmp_path / 'cache' / 'dnnlib'
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(root))
    assert dnnlib.make_cache_dir_path('torch_hub') == str(root / 'torch_hub')
    assert _mode(root) == 0o700 and not (root / 'torch_hub').exists()
    monkeypatch.delenv('DNNLIB_CACHE_DIR')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    (tmp_path / 'home').mkdir()
    assert dnnlib.make_cache_dir_path('downloads') == str(tmp_path / 'home' / '.cache' / 'dnnlib' / 'downloads')
    assert _mode(tmp_path / 'home' / '.cache' / 'dnnlib') == 0o700


@posix_only
@pytest.mark.parametrize('mode, who', [(0o770, 'its group'), (0o707, 'all users'), (0o777, 'its group and all users')])
def test_shared_cache_folder_is_refused(tmp_path, monkeypatch, mode, who):
    root = tmp_path / 'shared'
    root.mkdir()
    root.chmod(mode)
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(root))
    with pytest.raises(dnnlib.UserError) as info:
        dnnlib.make_cache_dir_path('downloads')
    message = str(info.value)
    assert '\n' not in message and f'cache folder {root}:' in message and who in message
    assert f'chmod 700 {root}' in message
    root.chmod(0o700)
    assert dnnlib.make_cache_dir_path('downloads') == str(root / 'downloads')


@posix_only
def test_shared_subfolder_and_explicit_cache_dir_are_refused(server, tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'root'))
    downloads = tmp_path / 'root' / 'downloads'
    downloads.mkdir(parents=True)
    downloads.chmod(0o777)
    with pytest.raises(dnnlib.UserError, match=f'cache folder {downloads}:'):
        util.open_url(server.base + '/weights.pkl', verbose=False)
    shared = tmp_path / 'explicit'
    shared.mkdir()
    shared.chmod(0o775)
    with pytest.raises(dnnlib.UserError, match=f'chmod 700 {shared}'):
        util.open_url(server.base + '/weights.pkl', cache_dir=str(shared), verbose=False)
    assert server.hits['/weights.pkl'] == 0


@posix_only
@pytest.mark.skipif(os.name == 'posix' and os.geteuid() != 0, reason='giving a folder away needs root')
def test_cache_folder_of_another_user_is_refused(tmp_path, monkeypatch):
    root = tmp_path / 'theirs'
    root.mkdir(mode=0o700)
    os.chown(root, 12345, -1)
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(root))
    with pytest.raises(dnnlib.UserError, match=f'cache folder {root}: it belongs to user id 12345'):
        dnnlib.make_cache_dir_path()


@posix_only
def test_cache_without_home_is_per_user_or_an_error(tmp_path, monkeypatch):
    import pwd
    for var in ['DNNLIB_CACHE_DIR', 'HOME', 'USERPROFILE']:
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / 'from_passwd'
    home.mkdir()
    monkeypatch.setattr(pwd, 'getpwuid', lambda uid: types.SimpleNamespace(pw_dir=str(home)))
    assert dnnlib.make_cache_dir_path('downloads') == str(home / '.cache' / 'dnnlib' / 'downloads')
    assert _mode(home / '.cache' / 'dnnlib') == 0o700

    def no_entry(uid):
        raise KeyError(uid)
    monkeypatch.setattr(pwd, 'getpwuid', no_entry)
    entries_before = set(os.listdir(tempfile.gettempdir()))
    with pytest.raises(dnnlib.UserError, match='Set DNNLIB_CACHE_DIR'):
        dnnlib.make_cache_dir_path('downloads')
    monkeypatch.setattr(pwd, 'getpwuid', lambda uid: types.SimpleNamespace(pw_dir='/nonexistent/home'))
    with pytest.raises(dnnlib.UserError, match='HOME and USERPROFILE are unset'):
        dnnlib.make_cache_dir_path()
    assert '.cache' not in set(os.listdir(tempfile.gettempdir())) - entries_before


def test_is_url():
    assert util.is_url('https://example.com/file.pkl')
    assert util.is_url('http://127.0.0.1:8000/x')
    assert not util.is_url('http://localhost/x')
    assert not util.is_url('/tmp/file.pkl')
    assert not util.is_url(42)
    assert not util.is_url('file:///tmp/x.pkl')
    assert util.is_url('file:///tmp/x.pkl', allow_file_urls=True)

#----------------------------------------------------------------------------
# open_url


def test_open_url_local_path_and_file_url(tmp_path):
    path = tmp_path / 'data with space.bin'
    path.write_bytes(b'\x00\x01payload')
    with util.open_url(str(path)) as f:
        assert f.read() == b'\x00\x01payload'
    assert util.open_url(str(path), return_filename=True) == str(path)
    with util.open_url(path.as_uri()) as f:
        assert f.read() == b'\x00\x01payload'
    assert util.open_url(path.as_uri(), return_filename=True) == str(path)
    with pytest.raises(ValueError, match='Not a valid URL'):
        util.open_url('http://nohost/x')


class _Server:
    """HTTP server on 127.0.0.1 in a background thread that counts the requests it answers."""

    def __init__(self, routes):
        self.hits = collections.Counter()
        self.routes = routes
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits[self.path] += 1
                body, headers = server.routes.get(self.path, (None, {}))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                headers = {'Content-Length': str(len(body)), **headers} # a route may announce more than it sends
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.HTTPServer(('127.0.0.1', 0), Handler)
        self.base = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = _Server({
        '/weights.pkl': (b'network bytes', {}),
        '/download?id=7': (b'named content', {'Content-Disposition': 'attachment; filename="model v2.pkl"'}),
        '/empty': (b'', {}),
        '/cut': (b'first half', {'Content-Length': '20'}),
    })
    yield srv
    srv.close()


def test_open_url_downloads_once_then_uses_cache(server, tmp_path, capsys):
    url = server.base + '/weights.pkl'
    with util.open_url(url, cache_dir=str(tmp_path)) as f:
        assert f.read() == b'network bytes'
    assert capsys.readouterr().out == f'Downloading {url} ... done\n'
    md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    expected_name = md5 + '_' + url.replace(':', '_').replace('/', '_')
    assert os.listdir(tmp_path) == [expected_name]

    with util.open_url(url, cache_dir=str(tmp_path), verbose=False) as f:
        assert f.read() == b'network bytes'
    assert util.open_url(url, cache_dir=str(tmp_path), return_filename=True) == str(tmp_path / expected_name)
    assert server.hits['/weights.pkl'] == 1
    assert capsys.readouterr().out == ''

    uncached = util.open_url(url, cache_dir=str(tmp_path), cache=False, verbose=False)
    assert isinstance(uncached, io.BytesIO) and uncached.read() == b'network bytes'
    assert server.hits['/weights.pkl'] == 2
    with pytest.raises(ValueError):
        util.open_url(url, cache=False, return_filename=True)


def test_open_url_default_cache_dir_and_server_file_name(server, tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path))
    url = server.base + '/download?id=7'
    path = util.open_url(url, return_filename=True, verbose=False)
    md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    assert path == os.path.join(str(tmp_path), 'downloads', md5 + '_model_v2.pkl')
    with open(path, 'rb') as f:
        assert f.read() == b'named content'


def test_open_url_uses_manually_placed_file(tmp_path):
    url = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'
    placed = tmp_path / '18d9c1159d16cd4cc6adf7db0f2dd2a9_inception.pkl'
    placed.write_bytes(b'offline copy')
    with util.open_url(url, cache_dir=str(tmp_path), verbose=False) as f:
        assert f.read() == b'offline copy'


def test_open_url_failures_name_url_and_cache_path(server, tmp_path, capsys):
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        closed_port = sock.getsockname()[1]
    url = f'http://127.0.0.1:{closed_port}/model.pkl'
    with pytest.raises(IOError) as info:
        util.open_url(url, cache_dir=str(tmp_path), num_attempts=2)
    message = str(info.value)
    md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    assert url in message and '2 attempt' in message
    assert os.path.join(str(tmp_path), md5 + '_') in message
    assert capsys.readouterr().out == f'Downloading {url} .... failed\n' # one dot per retry
    assert os.listdir(tmp_path) == []

    empty_url = server.base + '/empty'
    with pytest.raises(IOError, match='empty'):
        util.open_url(empty_url, cache_dir=str(tmp_path), num_attempts=1, verbose=False)
    with pytest.raises(IOError, match='404'):
        util.open_url(server.base + '/missing', cache_dir=str(tmp_path), num_attempts=1, verbose=False)
    assert os.listdir(tmp_path) == []


def _md5(url):
    return hashlib.md5(url.encode('utf-8')).hexdigest()


def test_interrupted_download_leaves_nothing_to_reuse(server, tmp_path, capsys):
    url = server.base + '/cut' # the server sends 10 of the 20 bytes it announces, then closes
    with pytest.raises(IOError, match=f'Could not download {url} after 2 attempt'):
        util.open_url(url, cache_dir=str(tmp_path), num_attempts=2, verbose=False)
    assert server.hits['/cut'] == 2 and os.listdir(tmp_path) == []
    server.routes['/cut'] = (b'the whole body', {})
    with util.open_url(url, cache_dir=str(tmp_path), verbose=False) as f:
        assert f.read() == b'the whole body'
    assert server.hits['/cut'] == 3 and os.listdir(tmp_path) == [_md5(url) + '_' + util._safe_file_name(url)]


def test_empty_cached_file_is_downloaded_again(server, tmp_path):
    url = server.base + '/weights.pkl'
    cached = tmp_path / (_md5(url) + '_' + util._safe_file_name(url))
    cached.write_bytes(b'')
    assert util.open_url(url, cache_dir=str(tmp_path), return_filename=True, verbose=False) == str(cached)
    assert cached.read_bytes() == b'network bytes' and server.hits['/weights.pkl'] == 1
    empty_elsewhere = tmp_path / (_md5(url) + '_other_name.pkl')
    empty_elsewhere.write_bytes(b'')
    with util.open_url(url, cache_dir=str(tmp_path), verbose=False) as f: # the empty one neither hits nor blocks the hit
        assert f.read() == b'network bytes'
    assert server.hits['/weights.pkl'] == 1 and not empty_elsewhere.exists()


def test_temp_files_of_killed_downloads_are_never_hits(server, tmp_path):
    url = server.base + '/weights.pkl'
    md5, name = _md5(url), util._safe_file_name(url)
    ours = [tmp_path / f'.{md5}_{name}.{i}abc.tmp' for i in range(2)] # as write_file_atomically names them
    edm2s = [tmp_path / f'tmp_{i}abc_{md5}_{name}' for i in range(2)] # as EDM2 names them
    other_url = tmp_path / f'tmp_0abc_{"0" * 32}_x'
    for path in ours + edm2s + [other_url]:
        path.write_bytes(b'partial')
    day_ago = time.time() - 25 * 3600
    for path in [ours[0], edm2s[0], other_url]:
        os.utime(path, (day_ago, day_ago))
    with util.open_url(url, cache_dir=str(tmp_path), verbose=False) as f:
        assert f.read() == b'network bytes'
    assert server.hits['/weights.pkl'] == 1
    # Temp files of this URL older than a day are gone; younger ones may belong to a running download.
    assert sorted(os.listdir(tmp_path)) == sorted([ours[1].name, edm2s[1].name, other_url.name, f'{md5}_{name}'])
    with util.open_url(url, cache_dir=str(tmp_path), verbose=False) as f:
        assert f.read() == b'network bytes'
    assert server.hits['/weights.pkl'] == 1
