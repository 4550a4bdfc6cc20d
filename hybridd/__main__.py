"""`python -m hybridd` is the `hybridd` command."""

import sys

from hybridd.cli import main

sys.exit(main())
