"""``python -m deepseek_rs ...``: the ``deepseek-rs`` command line."""

import sys

from .cli import main

sys.exit(main())
