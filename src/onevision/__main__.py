"""`python -m onevision ...` = the `onevision` command."""

import sys

from onevision.cli import main

sys.exit(main())
