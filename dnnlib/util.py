"""Generic utilities: attribute dicts, logging, cache paths, name lookup, time formatting, URL access."""

import ctypes
import fnmatch
import glob
import hashlib
import html
import importlib
import inspect
import io
import math
import os
import pickle
import re
import shutil
import stat
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import requests

#----------------------------------------------------------------------------


class UserError(ValueError):
    """A file, option or value given by the user that cannot be used; commands report it as one line.

    `option` may name the keyword argument at fault, so that a command line can name its own option.
    """

    def __init__(self, message, option=None):
        super().__init__(message)
        self.option = option


class EasyDict(dict):
    """A dict whose items can also be read and written as attributes."""

    def __getattr__(self, name):
        if name in self:
            return self[name]
        raise AttributeError(f"EasyDict has no key '{name}'")

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        if name not in self:
            raise AttributeError(f"EasyDict has no key '{name}'")
        del self[name]

#----------------------------------------------------------------------------


class Logger:
    """Tees everything printed to stdout and stderr into an optional log file.

    While active, both sys.stdout and sys.stderr point at the logger; its output goes to the
    original stdout and to the file. close() (or leaving the `with` block) restores the streams.
    """

    def __init__(self, file_name=None, file_mode='w', should_flush=True):
        self.should_flush = should_flush
        self.file = None if file_name is None else open(file_name, file_mode)
        self.stdout, self.stderr = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = self

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def write(self, text):
        text = text.decode() if isinstance(text, bytes) else text
        if text:
            for stream in [self.file, self.stdout]:
                if stream is not None:
                    stream.write(text)
            if self.should_flush:
                self.flush()

    def flush(self):
        for stream in [self.file, self.stdout]:
            if stream is not None:
                stream.flush()

    def close(self):
        self.flush()
        sys.stdout = self.stdout if sys.stdout is self else sys.stdout
        sys.stderr = self.stderr if sys.stderr is self else sys.stderr
        log_file, self.file = self.file, None
        if log_file is not None:
            log_file.close()

#----------------------------------------------------------------------------
# Cache directory for downloads and third-party model weights.
#
# Whatever lands in the cache is later unpickled or imported without asking, so the cache has to be
# private: a folder that belongs to the current user and that nobody else can write to.

_cache_dir_override = None


def set_cache_dir(path):
    """Use `path` as the cache root from now on; None goes back to the environment's choice."""
    global _cache_dir_override
    _cache_dir_override = path


def _home_from_user_database():
    """The current user's home folder when HOME/USERPROFILE are unset, or None if there is none."""
    try:
        import pwd
    except ImportError: # not POSIX: expanduser() knows the Windows variables
        home = os.path.expanduser('~')
        return home if home != '~' and os.path.isdir(home) else None
    try:
        home = pwd.getpwuid(os.getuid()).pw_dir
    except KeyError: # e.g. a container user id without an entry
        return None
    return home if home and os.path.isdir(home) else None


def _cache_root():
    if _cache_dir_override is not None:
        return _cache_dir_override
    for var, below in [('DNNLIB_CACHE_DIR', ()), ('HOME', ('.cache', 'dnnlib')), ('USERPROFILE', ('.cache', 'dnnlib'))]:
        if os.environ.get(var):
            return os.path.join(os.environ[var], *below)
    home = _home_from_user_database()
    if home is None:
        raise UserError('Cannot place the download cache: HOME and USERPROFILE are unset and the user database '
                        'has no home folder for this user. Set DNNLIB_CACHE_DIR to a folder of your own.')
    return os.path.join(home, '.cache', 'dnnlib')


def _check_private_dir(path):
    """Raise UserError unless the existing folder `path` is owned by this user and not writable by others.

    POSIX only; elsewhere the permission bits say nothing and the check is skipped.
    """
    if os.name != 'posix':
        return
    info = os.stat(path)
    if info.st_uid != os.geteuid():
        raise UserError(f'Refusing to use the cache folder {path}: it belongs to user id {info.st_uid}, not to you '
                        f'(user id {os.geteuid()}), and cached files are loaded without asking. Set DNNLIB_CACHE_DIR '
                        f'to a folder of your own, or remove {path} so that it is created again.')
    if info.st_mode & 0o022:
        who = {0o020: 'its group', 0o002: 'all users', 0o022: 'its group and all users'}[info.st_mode & 0o022]
        raise UserError(f'Refusing to use the cache folder {path}: it is writable by {who} '
                        f'(mode {stat.S_IMODE(info.st_mode):o}), and cached files are loaded without asking. '
                        f'Make it private with `chmod 700 {path}`, or set DNNLIB_CACHE_DIR to a private folder.')


def _make_private_dir(path):
    """Create `path` (mode 0700) unless it exists, then check that it is private (see _check_private_dir)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as err:
        raise UserError(f'Cannot create the cache folder {path} ({err.strerror or err}). '
                        f'Set DNNLIB_CACHE_DIR to a folder of your own.') from err
    _check_private_dir(path)


def make_cache_dir_path(*paths):
    """Path of `paths` below the cache root, which is created (mode 0700) and checked first.

    The root is the first of: the set_cache_dir() value, $DNNLIB_CACHE_DIR, $HOME/.cache/dnnlib,
    $USERPROFILE/.cache/dnnlib, and ~/.cache/dnnlib with the home folder from the user database.
    There is no shared fallback (such as the temp dir): without any of these it raises UserError.

    Cached files are unpickled or imported without asking, so the root must belong to the current
    user and must not be writable by group or others, otherwise UserError names the folder and the
    fix. This holds for an explicitly chosen root (set_cache_dir, $DNNLIB_CACHE_DIR) as well: where
    it comes from does not make a shared folder safe. Folders of `paths` that already exist are
    checked in the same way; the missing ones are left to the caller to create.
    """
    root = _cache_root()
    _make_private_dir(root)
    for depth in range(1, len(paths) + 1):
        below = os.path.join(root, *paths[:depth])
        if not os.path.isdir(below):
            break
        _check_private_dir(below)
    return os.path.join(root, *paths)

#----------------------------------------------------------------------------
# Small conversions.


def _format_duration(seconds, max_units):
    """Whole seconds as days/hours/minutes/seconds, from the largest non-zero unit, at most max_units units."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    units = list(zip((days, hours, minutes, secs), 'dhms'))
    first = next((i for i, (value, _) in enumerate(units) if value), len(units) - 1)
    shown = units[first:first + max_units]
    return ' '.join(f'{value}{unit}' if i == 0 else f'{value:02}{unit}' for i, (value, unit) in enumerate(shown))


def format_time(seconds):
    """Human-readable duration with up to three units, e.g. '1h 02m 03s'."""
    return _format_duration(seconds, max_units=3)


def format_time_brief(seconds):
    """Like format_time(), but keeps only the two largest units."""
    return _format_duration(seconds, max_units=2)


def tuple_product(t):
    return math.prod(t)


_CTYPE_BY_DTYPE_NAME = {
    'uint8': ctypes.c_ubyte, 'uint16': ctypes.c_uint16, 'uint32': ctypes.c_uint32, 'uint64': ctypes.c_uint64,
    'int8': ctypes.c_byte, 'int16': ctypes.c_int16, 'int32': ctypes.c_int32, 'int64': ctypes.c_int64,
    'float32': ctypes.c_float, 'float64': ctypes.c_double,
}


def get_dtype_and_ctype(type_obj):
    """Map a type given as a name, numpy type or dtype to the matching (numpy dtype, ctypes type)."""
    if isinstance(type_obj, str):
        name = type_obj
    else:
        name = getattr(type_obj, '__name__', None) or getattr(type_obj, 'name', None)
    if name not in _CTYPE_BY_DTYPE_NAME:
        raise ValueError(f'Unsupported type {type_obj!r}; expected one of {sorted(_CTYPE_BY_DTYPE_NAME)}')
    dtype = np.dtype(name)
    ctype = _CTYPE_BY_DTYPE_NAME[name]
    assert dtype.itemsize == ctypes.sizeof(ctype)
    return dtype, ctype


def is_pickleable(obj):
    try:
        pickle.dump(obj, io.BytesIO())
    except Exception:
        return False
    return True

#----------------------------------------------------------------------------
# Looking up functions and classes by their dotted names.

_MODULE_SHORTHANDS = {'np.': 'numpy.', 'tf.': 'tensorflow.'}


def _import_if_present(module_name):
    """Import a module; None if that module (or a parent package) does not exist.

    Errors raised while executing an existing module, including its own missing dependencies,
    propagate unchanged.
    """
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name == err.name or module_name.startswith(err.name + '.')):
            return None
        raise


def get_module_from_obj_name(obj_name):
    """Split a dotted name into (module, name within the module), using the longest importable prefix."""
    for short, full in _MODULE_SHORTHANDS.items():
        if obj_name.startswith(short):
            obj_name = full + obj_name[len(short):]
    parts = obj_name.split('.')
    for split in range(len(parts), 0, -1):
        module = _import_if_present('.'.join(parts[:split]))
        if module is None:
            continue
        local_name = '.'.join(parts[split:])
        try:
            get_obj_from_module(module, local_name)
        except AttributeError:
            continue
        return module, local_name
    raise ImportError(f"Cannot resolve '{obj_name}': no importable module defines it")


def get_obj_from_module(module, obj_name):
    """Follow a dotted attribute path inside a module; the empty path gives the module itself."""
    obj = module
    for attr in filter(None, obj_name.split('.')):
        obj = getattr(obj, attr)
    return obj


def get_obj_by_name(name):
    module, local_name = get_module_from_obj_name(name)
    return get_obj_from_module(module, local_name)


def call_func_by_name(*args, func_name=None, **kwargs):
    """Call a function given as a callable or as its dotted name."""
    if func_name is None:
        raise ValueError('call_func_by_name() needs func_name')
    func = func_name if callable(func_name) else get_obj_by_name(func_name)
    if not callable(func):
        raise TypeError(f"'{func_name}' names {type(func).__name__} object, not a callable")
    return func(*args, **kwargs)


def construct_class_by_name(*args, class_name=None, **kwargs):
    """Instantiate a class given as a class object or as its dotted name."""
    if class_name is None:
        raise ValueError('construct_class_by_name() needs class_name')
    return call_func_by_name(*args, func_name=class_name, **kwargs)


def get_module_dir_by_obj_name(obj_name):
    module, _ = get_module_from_obj_name(obj_name)
    return os.path.dirname(inspect.getfile(module))


def is_top_level_function(obj):
    module = sys.modules.get(getattr(obj, '__module__', None))
    return callable(obj) and module is not None and getattr(module, getattr(obj, '__name__', ''), None) is obj


def get_top_level_function_name(obj):
    """Dotted name under which `obj` can be imported again (the script name replaces __main__)."""
    if not is_top_level_function(obj):
        raise ValueError(f'{obj!r} is not a module-level function')
    module_name = obj.__module__
    if module_name == '__main__':
        module_name = os.path.splitext(os.path.basename(sys.modules['__main__'].__file__))[0]
    return f'{module_name}.{obj.__name__}'

#----------------------------------------------------------------------------
# File-system helpers.


def list_dir_recursively_with_ignore(dir_path, ignores=None, add_base_to_relative=False):
    """All files below dir_path as (absolute path, relative path) pairs.

    Files and directories whose names match any fnmatch pattern in `ignores` are skipped;
    with add_base_to_relative the relative paths start with the name of dir_path.
    """
    if not os.path.isdir(dir_path):
        raise NotADirectoryError(f'Not a directory: {dir_path}')
    patterns = list(ignores or [])
    skipped = lambda name: any(fnmatch.fnmatch(name, p) for p in patterns)
    base_name = os.path.basename(os.path.normpath(dir_path))
    pairs = []
    for root, dirs, files in os.walk(dir_path, topdown=True):
        dirs[:] = [d for d in dirs if not skipped(d)]
        for file_name in files:
            if skipped(file_name):
                continue
            abs_path = os.path.join(root, file_name)
            rel_path = os.path.relpath(abs_path, dir_path)
            pairs.append((abs_path, os.path.join(base_name, rel_path) if add_base_to_relative else rel_path))
    return pairs


def copy_files_and_create_dirs(files):
    """Copy (source, destination) pairs, creating destination directories as needed."""
    for src, dst in files:
        dst_dir = os.path.dirname(dst)
        if dst_dir:
            os.makedirs(dst_dir, exist_ok=True)
        shutil.copyfile(src, dst)

#----------------------------------------------------------------------------
# URLs and downloads.


def _has_dotted_host(url):
    parsed = urllib.parse.urlparse(url)
    return bool(parsed.scheme) and '.' in parsed.netloc


def is_url(obj, allow_file_urls=False):
    """True for strings that look like network URLs (scheme plus a host containing a dot)."""
    if not isinstance(obj, str) or '://' not in obj:
        return False
    if allow_file_urls and obj.startswith('file://'):
        return True
    try:
        return _has_dotted_host(obj) and _has_dotted_host(urllib.parse.urljoin(obj, '/'))
    except ValueError:
        return False


def _file_url_to_path(url):
    path = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
    if re.match(r'^[/\\][A-Za-z]:', path):
        path = path[1:] # '/C:/x' -> 'C:/x' on Windows
    return path


def _safe_file_name(name):
    return re.sub(r'[^0-9a-zA-Z\-._]', '_', name)[:128]


def _fetch_url(session, url):
    """Download one URL. Returns (content bytes, file name suggested by the server or None)."""
    with session.get(url, allow_redirects=True) as res:
        res.raise_for_status()
        content = res.content
        if not content:
            raise IOError('server sent an empty response')
        expected = res.headers.get('Content-Length', '')
        if expected.isdigit() and res.headers.get('Content-Encoding', 'identity') == 'identity' and len(content) != int(expected):
            raise IOError(f'incomplete download: got {len(content)} of {expected} bytes')
        if len(content) < 8192 and 'download_warning' in res.headers.get('Set-Cookie', ''):
            raise _RedirectNeeded(_google_drive_confirm_link(url, content))
        if len(content) < 8192 and b'Google Drive - Quota exceeded' in content:
            raise IOError('Google Drive download quota exceeded; try again later')
        match = re.search(r'filename="([^"]*)"', res.headers.get('Content-Disposition', ''))
        return content, (match.group(1) if match else None)


class _RedirectNeeded(IOError):
    def __init__(self, next_url):
        super().__init__('Google Drive asked for a download confirmation')
        self.next_url = next_url


def _google_drive_confirm_link(url, page):
    links = [html.unescape(s) for s in page.decode('utf-8', errors='replace').split('"') if 'export=download' in s]
    return urllib.parse.urljoin(url, links[0]) if len(links) == 1 else url


def _download(url, num_attempts, verbose, manual_path):
    if verbose:
        print(f'Downloading {url} ...', end='', flush=True)
    last_error = None
    with requests.Session() as session:
        fetch_url = url
        for attempt in range(num_attempts):
            try:
                content, server_name = _fetch_url(session, fetch_url)
                if verbose:
                    print(' done')
                return content, server_name
            except _RedirectNeeded as err:
                fetch_url, last_error = err.next_url, err
            except (requests.RequestException, IOError) as err:
                last_error = err
            if verbose and attempt + 1 < num_attempts:
                print('.', end='', flush=True)
    if verbose:
        print(' failed')
    hint = f' If this machine is offline, download the file elsewhere and save it as {manual_path}' if manual_path else ''
    raise IOError(f'Could not download {url} after {num_attempts} attempt(s): {last_error}.{hint}')


_STALE_TEMP_SECONDS = 24 * 3600


def _cache_hit(cache_dir, url_md5):
    """The cached download of the URL with this md5, or None.

    As in EDM2, a hit is the only file named '<md5>_*'. Temporary files never match: ours are
    named '.<md5>_<name>.<hex>.tmp' and EDM2's 'tmp_<hex>_<md5>_<name>', and neither '.' nor 't' can
    start an md5. An empty file (a download that went wrong elsewhere) is removed and is no hit.
    """
    hits = []
    for path in glob.glob(os.path.join(glob.escape(cache_dir), url_md5 + '_*')):
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            os.remove(path)
        elif os.path.isfile(path):
            hits.append(path)
    return hits[0] if len(hits) == 1 else None


def _remove_stale_temp_files(cache_dir, url_md5):
    """Remove temporary files that downloads of this URL left when killed more than a day ago.

    Younger ones may belong to a download that is still running in another process.
    """
    patterns = [f'.{url_md5}_*.tmp', f'tmp_*_{url_md5}_*']
    for pattern in patterns:
        for path in glob.glob(os.path.join(glob.escape(cache_dir), pattern)):
            try:
                if time.time() - os.path.getmtime(path) > _STALE_TEMP_SECONDS:
                    os.remove(path)
            except OSError:
                pass # gone already, or not ours to remove


def open_url(url, cache_dir=None, num_attempts=10, verbose=True, return_filename=False, cache=True):
    """Open a local path, a file:// URL or an http(s) URL as a binary file object.

    Downloads are kept under cache_dir (default: make_cache_dir_path('downloads')) and reused
    on later calls. With return_filename the local file name is returned instead of a file
    object; with cache=False the download is returned as an in-memory stream.

    The cache folder is created with mode 0700 and refused (UserError) if it is not private. A
    download is written to a temporary file in that folder, flushed to disk and renamed into
    place only once it is complete, so an interrupted download never becomes a cache hit.
    """
    if num_attempts < 1:
        raise ValueError(f'num_attempts must be at least 1, got {num_attempts}')
    if return_filename and not cache:
        raise ValueError('open_url(): return_filename=True requires cache=True')

    if not re.match(r'^[a-z]+://', url):
        return url if return_filename else open(url, 'rb')
    if url.startswith('file://'):
        path = _file_url_to_path(url)
        return path if return_filename else open(path, 'rb')
    if not is_url(url):
        raise ValueError(f'Not a valid URL: {url!r}')

    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    if cache:
        if cache_dir is None:
            cache_dir = make_cache_dir_path('downloads')
        _make_private_dir(cache_dir)
        hit = _cache_hit(cache_dir, url_md5)
        if hit is not None:
            return hit if return_filename else open(hit, 'rb')
        _remove_stale_temp_files(cache_dir, url_md5)

    manual_path = os.path.join(cache_dir, f'{url_md5}_{_safe_file_name(url)}') if cache else None
    content, server_name = _download(url, num_attempts, verbose, manual_path)
    if not cache:
        return io.BytesIO(content)

    # Imported here: torch_utils imports dnnlib, so a module-level import would be circular.
    from torch_utils.distributed import write_file_atomically
    cache_file = os.path.join(cache_dir, f'{url_md5}_{_safe_file_name(server_name or url)}')
    write_file_atomically(cache_file, lambda f: f.write(content))
    return cache_file if return_filename else open(cache_file, 'rb')

#----------------------------------------------------------------------------
