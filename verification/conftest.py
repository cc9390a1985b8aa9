"""Registers the hypothesis profiles ``ci`` (default) and ``thorough``; see :mod:`verification.profiles`."""

from verification.profiles import register

register()
