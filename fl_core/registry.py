"""Name -> factory registries with lazy third-party plugins.

Built-in entries register themselves with ``@REGISTRY.register("name")`` when
their module is imported. Third-party packages expose entries through a Python
entry point group; such a plugin is imported only when a config names it.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of factories (classes or functions)."""

    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that adds ``obj`` under ``name``; a name can be taken once."""

        def add(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if isinstance(obj, type) and hasattr(obj, "name"):
                obj.name = name  # attacks and defenses know their registered name
            self._entries[name] = obj
            return obj

        return add

    def _entry_point(self, name: str):
        if self.entry_point_group is None:
            return None
        matches = entry_points(group=self.entry_point_group, name=name)
        return next(iter(matches), None)

    def __contains__(self, name: str) -> bool:
        return name in self._entries or self._entry_point(name) is not None

    def get(self, name: str) -> T:
        """The entry called ``name``; loads an entry-point plugin on first use."""
        if name not in self._entries:
            ep = self._entry_point(name)
            if ep is not None:
                self._entries[name] = ep.load()
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        """Built-in and already loaded names, plus installed entry-point names."""
        names = set(self._entries)
        if self.entry_point_group is not None:
            names.update(ep.name for ep in entry_points(group=self.entry_point_group))
        return sorted(names)


def import_plugins(modules: list[str] | tuple[str, ...]) -> None:
    """Import user modules (``--plugin``) so that their registrations run."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ImportError(f"--plugin {module!r} could not be imported: {err}") from err
