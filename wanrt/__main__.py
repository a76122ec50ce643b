"""``python -m wanrt ...`` (and ``torchrun --nproc-per-node N -m wanrt generate ...``): the ``wanrt`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
