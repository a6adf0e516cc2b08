"""`python -m workers.cli`: the `bcfy` command."""

import sys

from workers.cli.main import main

sys.exit(main())
