"""``python -m oba_fx`` (and ``torchrun -m oba_fx``): the ``oba-fx`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
