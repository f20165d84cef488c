"""`python -m kiln ...` is `kiln ...` (and what `torchrun ... -m kiln serve ENGINE` runs)."""

import sys

from kiln.cli import main

sys.exit(main())
