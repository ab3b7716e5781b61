"""
The `af2` console script.

It lives outside the `transformers_af2` package on purpose: importing the package imports torch and transformers
(seconds), and a Ctrl-C during that import must end in one line and exit status 130, not a traceback. Only a module
that does not trigger the package import can catch it.
"""

import sys

INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def main() -> int:
    try:
        from transformers_af2.cli import main as run
    except KeyboardInterrupt:
        print("af2: interrupted", file=sys.stderr)
        return INTERRUPTED
    return run()


if __name__ == "__main__":
    sys.exit(main())
