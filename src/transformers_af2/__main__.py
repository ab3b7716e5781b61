"""`python -m transformers_af2 ...` is the `af2` command; torchrun and `accelerate launch -m` start it this way."""

import sys

from .commands import main

if __name__ == "__main__":
    sys.exit(main())
