"""`python -m hf_moe_offload ...`: the same command line as the `hf-moe-offload` console script."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
