"""``python -m rankcut`` (and ``torchrun -m rankcut``): the command line (``rankcut.launch``)."""

import sys

from .launch import main

sys.exit(main())
