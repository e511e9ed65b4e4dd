"""Command-line helpers shared by the scripts: option types that reject bad values up front, and the
conversion of user errors into one-line messages."""

import contextlib
import math
import re

import click

from . import util

#----------------------------------------------------------------------------


class FiniteFloat(click.FloatRange):
    """A float option that must be finite (never nan; inf only with allow_inf), optionally within a range."""
    name = 'float'

    def __init__(self, min=None, max=None, min_open=False, max_open=False, allow_inf=False):
        super().__init__(min=min, max=max, min_open=min_open, max_open=max_open)
        self.allow_inf = allow_inf

    def _describe_range(self):
        return 'finite' if self.min is None and self.max is None else super()._describe_range()

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if math.isnan(number) or (math.isinf(number) and not self.allow_inf):
            self.fail(f'{value!r} is not a finite number', param, ctx)
        return number


class ImageCount(click.ParamType):
    """A number of images: an integer, optionally with a binary suffix Ki, Mi or Gi (e.g. 128Ki)."""
    name = 'NIMG'
    _shifts = {'': 0, 'Ki': 10, 'Mi': 20, 'Gi': 30}

    def __init__(self, min=0):
        self.min = min

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            count = value
        else:
            match = re.fullmatch(r'(\d+)(Ki|Mi|Gi)?', str(value).strip())
            if match is None:
                self.fail(f'{value!r} is not an image count; expected an integer optionally followed by Ki, Mi or Gi, '
                    'e.g. 4096, 128Ki or 8Mi', param, ctx)
            count = int(match.group(1)) << self._shifts[match.group(2) or '']
        if count < self.min:
            self.fail(f'{value!r} is below the smallest allowed count, {self.min}', param, ctx)
        return count


@contextlib.contextmanager
def user_errors():
    """Report a UserError raised in the body as one line, without a traceback."""
    try:
        yield
    except util.UserError as err:
        raise click.ClickException(str(err)) from None
