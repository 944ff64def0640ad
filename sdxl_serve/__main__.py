"""`python -m sdxl_serve ...`: the same as the `sdxl-serve` console script."""

import sys

from sdxl_serve.cli import main

sys.exit(main())
