"""``python -m autoprune.cli``: the same as the ``autoprune`` console script."""

import sys

from autoprune.cli import main

sys.exit(main())
