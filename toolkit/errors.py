"""The toolkit's one error type, and its one exit-code convention.

Anything the user can act on — an unusable input, an option out of range, a full disk, an output directory held by
another run — is raised as :class:`ArmorError` wherever it is found, with a message that names the problem and the
fix. The command line catches it in one place (:class:`toolkit.cli.ArmorGroup`) and prints ``error: <problem>;
<fix>`` on one line of stderr, with no traceback, and exits with the error's code:

====  ==========================================================================================
code  meaning
====  ==========================================================================================
0     success
1     the run could not complete for a reason outside its inputs: disk full, permissions, an
      output directory locked by another run, a device that is not usable here
2     bad input or usage: a file that is missing, truncated or malformed, NaN/Inf in weights or
      calibration, an option out of range (click's own usage errors are 2 as well)
====  ==========================================================================================
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_INPUT = 2
EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 the run could not complete for a reason outside its inputs (disk full, permissions, "
    "output locked by another run, unusable device); 2 bad input or usage (missing, truncated or malformed files, "
    "NaN/Inf values, options out of range)."
)


class ArmorError(Exception):
    """A problem the user can act on. ``problem`` says what is wrong, ``fix`` what to do about it; ``exit_code`` is
    :data:`EXIT_INPUT` (bad input, the default) or :data:`EXIT_FAILURE` (the environment)."""

    def __init__(self, problem: str, fix: str = "", *, exit_code: int = EXIT_INPUT) -> None:
        super().__init__(f"{problem}; {fix}" if fix else problem)
        self.problem = problem
        self.fix = fix
        self.exit_code = exit_code

    def __reduce__(self) -> tuple:
        """Pickle with problem, fix and exit code (``torchrun`` ranks hand errors to each other)."""
        return (type(self), (self.problem, self.fix), {"exit_code": self.exit_code})


def os_error_message(err: OSError) -> str:
    """One line for an ``OSError``: its reason and the file(s) it names, never ``(None)``."""
    reason = err.strerror or str(err) or type(err).__name__
    files = [f for f in (err.filename, getattr(err, "filename2", None)) if f]
    return reason + (f" ({' -> '.join(map(str, files))})" if files else "")
