"""``python -m rankcut`` (and ``torchrun -m rankcut``): the command line."""

import sys

from .cli import main

sys.exit(main())
