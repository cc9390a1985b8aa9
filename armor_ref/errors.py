"""The one exception type for problems with what the user handed us (files, shapes, options).

The command line catches it in a single place and prints ``error: <problem>; <fix>`` on one line, with no
traceback, and exits non-zero. Library code raises it wherever an input is unusable, so the message can name
the file or tensor at fault and say what to do about it.
"""

from __future__ import annotations


class InputError(Exception):
    """An unusable input. ``problem`` says what is wrong, ``fix`` what the user can do about it."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; {fix}")
        self.problem = problem
        self.fix = fix
