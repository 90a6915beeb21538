"""`python -m pilot_hf` is `pilot-hf`."""

import sys

from .commands import main

sys.exit(main())
