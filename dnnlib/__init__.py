"""Small general-purpose helpers shared by the whole project."""

from . import util
from .util import EasyDict, UserError, make_cache_dir_path
