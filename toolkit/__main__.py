"""``python -m toolkit`` (and ``torchrun -m toolkit``): the ``armor-ref`` command line."""

from toolkit.cli import main

main()
