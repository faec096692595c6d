"""`revglow.kernels` in a checkout used without installation.

setup.py installs the top-level kernels/ folder as `revglow.kernels` (a top-level package named `kernels` would
collide with one on PyPI). A checkout put on sys.path as it is (PYTHONPATH=/path/to/checkout, or a script run
from it) has no revglow/kernels/, so `import revglow.kernels` would fail and kernels="auto" would quietly run
the torch reference. When revglow is imported from such a checkout, the finder below maps `revglow.kernels` to
the kernels/ folder beside the package (an editable install maps it to the same folder). It imports nothing,
triton included, until revglow.kernels is imported, and it is not installed when revglow/ has a kernels/ of its
own or no checkout's kernels/ lies beside it (an installed wheel).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

__all__ = ["install_checkout_kernels_finder", "checkout_kernels_dir"]

_NAME = "revglow.kernels"


def checkout_kernels_dir(package_dir: str) -> str | None:
    """The kernels/ folder of the checkout that holds `package_dir` (revglow/), if revglow has none of its own."""
    if os.path.isdir(os.path.join(package_dir, "kernels")):
        return None
    candidate = os.path.join(os.path.dirname(package_dir), "kernels")
    if os.path.isfile(os.path.join(candidate, "__init__.py")) and \
            os.path.isfile(os.path.join(candidate, "actnorm_conv1x1.py")):
        return candidate
    return None


class _CheckoutKernelsFinder(importlib.abc.MetaPathFinder):
    def __init__(self, kernels_dir: str):
        self.kernels_dir = kernels_dir

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _NAME:
            return None   # submodules are found through the package's __path__, set below
        return importlib.util.spec_from_file_location(
            _NAME, os.path.join(self.kernels_dir, "__init__.py"), submodule_search_locations=[self.kernels_dir])


def install_checkout_kernels_finder(package_dir: str | None = None) -> None:
    """Put the finder first on sys.meta_path when revglow (`package_dir`, default: this package's folder) is
    imported from a checkout that was not installed. Idempotent."""
    kernels_dir = checkout_kernels_dir(package_dir or os.path.dirname(os.path.abspath(__file__)))
    if kernels_dir is None or any(isinstance(f, _CheckoutKernelsFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _CheckoutKernelsFinder(kernels_dir))
