"""``python -m ddpm`` (and ``accelerate launch -m ddpm``) runs the command line."""

import sys

from .cli import main

sys.exit(main())
