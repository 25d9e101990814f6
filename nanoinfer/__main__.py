"""`python -m nanoinfer`: the same as the `nanoinfer` command (torchrun launches it this way)."""

import sys

from nanoinfer.cli import main

sys.exit(main())
