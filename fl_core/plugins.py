"""Discovery of built-in plugin files: every module of a package registers itself on import."""
from __future__ import annotations

import importlib
import pkgutil


def import_package_modules(package_name: str, package_path) -> None:
    """Import every module beside a package's ``__init__`` so that dropping in one file adds an entry."""
    for info in pkgutil.iter_modules(package_path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")
