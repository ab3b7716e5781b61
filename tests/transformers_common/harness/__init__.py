"""transformers' common model test mixins, one copy per tested transformers release (see ../README.md).

`for_installed_release()` gives the package whose files came from the installed release's source, or None when this
project does not carry one (a release inside the declared range that CI does not test).
"""

import importlib

import transformers
from packaging.version import Version

#: transformers release (major.minor) -> the package holding that release's test_modeling_common.py.
RELEASES = {"5.23": "v5_23", "5.25": "v5_25"}

INSTALLED_RELEASE = f"{Version(transformers.__version__).major}.{Version(transformers.__version__).minor}"


def for_installed_release():
    package = RELEASES.get(INSTALLED_RELEASE)
    return None if package is None else importlib.import_module(f"{__name__}.{package}")
