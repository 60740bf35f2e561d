"""``python -m salience.distributed`` / ``torchrun --nproc-per-node N -m salience.distributed``: see
:mod:`salience.distributed.launch`."""

import sys

from .launch import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
