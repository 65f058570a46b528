"""``python -m distilled_decoding`` = the ``distilled-decoding`` command."""

import sys

from distilled_decoding.cli import main

sys.exit(main())
