"""
The former home of the `af2` command line and of `load_model_and_processor`, kept for scripts that import them from
here: the commands are `transformers_af2.commands`, loading a model is `transformers_af2.loading`. Nothing in the
package imports this module.
"""

import sys

from .commands import build_parser, main, run
from .loading import load_model_and_processor, model_loading_options, resolve_device

__all__ = ["build_parser", "load_model_and_processor", "main", "model_loading_options", "resolve_device", "run"]

if __name__ == "__main__":
    sys.exit(main())
