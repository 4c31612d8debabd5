"""`python -m meestral.cli ...`: the `meestral` command."""

import sys

from meestral.cli.main import main

sys.exit(main())
