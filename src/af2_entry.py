"""
The `af2` console script.

It lives outside the `transformers_af2` package on purpose. Importing the package imports torch and transformers
(seconds: its `__init__` registers AF2 with transformers' Auto classes), which reading the command line does not need:
`af2 --help`, a usage error or a typo answer at once. So the package's `__init__` runs only once the command line is
parsed, just before the command itself. And a Ctrl-C during any of it ends in one line and exit status 130, not a
traceback; only a module that does not trigger the package import can catch it.
"""

import importlib
import importlib.util
import sys

INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def _command_line_module():
    """
    `transformers_af2.commands`, imported with the package's `__init__` not yet run, and the function that runs it (on
    the same module object, so everything imported so far stays that package's). The command line modules import
    nothing heavy at module level; their commands import what they use.
    """
    if "transformers_af2" in sys.modules:  # already imported whole (e.g. `python -m transformers_af2`)
        return importlib.import_module("transformers_af2.commands"), lambda: None
    spec = importlib.util.find_spec("transformers_af2")
    package = importlib.util.module_from_spec(spec)
    sys.modules["transformers_af2"] = package
    return importlib.import_module("transformers_af2.commands"), lambda: spec.loader.exec_module(package)


def main() -> int:
    try:
        cli, import_package = _command_line_module()
        args = cli.parse_args()
        import_package()
    except KeyboardInterrupt:
        print("af2: interrupted", file=sys.stderr)
        return INTERRUPTED
    return cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
