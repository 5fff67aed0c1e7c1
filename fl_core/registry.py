"""Name -> factory registries with lazy plugins: the attacks, defenses and triggers a config can name.

The registries live here, below the plugin packages, so that ``fl_core`` never imports ``attacks`` or
``defenses``: those packages register into them. The built-in packages are listed in the entry point
group ``fmfl.builtins`` (``pyproject.toml``) and imported on the first lookup; third-party packages
expose single entries through the groups ``fmfl.attacks``, ``fmfl.defenses`` and ``fmfl.triggers``,
imported only when a config names them.
"""
from __future__ import annotations

import functools
import importlib
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

T = TypeVar("T")
BUILTINS_GROUP = "fmfl.builtins"
_builtins_loaded = False


def load_builtins() -> None:
    """Import the built-in plugin packages (entry point group ``fmfl.builtins``) once per process."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True  # set first: the packages look names up while they register
    for ep in entry_points(group=BUILTINS_GROUP):
        ep.load()


@functools.lru_cache(maxsize=None)
def plugin_entry_points(group: str) -> tuple:
    """The installed entry points of ``group``, read once per process (a scan of every installed package
    costs tens of milliseconds, and a grid looks names up for each of its cells)."""
    return tuple(entry_points(group=group))


class Registry(Generic[T]):
    """A named collection of factories (classes or functions)."""

    def __init__(self, kind: str, entry_point_group: str | None = None, base: str | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.base = base  # the name of the fl_core.hooks class every entry must subclass, if any
        self._entries: dict[str, T] = {}

    def check_entry(self, name: str, obj) -> None:
        """A TypeError unless ``obj`` subclasses the registry's base class and every hook it overrides takes
        the base hook's parameters (a wrong signature would only fail rounds into a run)."""
        import inspect

        from fl_core import hooks

        base = getattr(hooks, self.base)
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise TypeError(f"{self.kind} {name!r}: {obj!r} is not a subclass of fl_core.hooks.{self.base}")
        for hook, original in vars(base).items():
            if hook.startswith("_") or not inspect.isfunction(original) or getattr(obj, hook) is original:
                continue
            want = list(inspect.signature(original).parameters)
            got = inspect.signature(getattr(obj, hook)).parameters
            required = [p for p, v in got.items() if v.default is v.empty and v.kind in (v.POSITIONAL_ONLY,
                                                                                          v.POSITIONAL_OR_KEYWORD)]
            takes_all = any(v.kind is v.VAR_POSITIONAL for v in got.values())
            if not takes_all and (len(required) > len(want) or len(got) < len(want)):
                raise TypeError(f"{self.kind} {name!r}: {hook}{inspect.signature(getattr(obj, hook))} does not take "
                                f"the hook's parameters {hook}({', '.join(want)})")

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that adds ``obj`` under ``name``; a name can be taken once."""

        def add(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if self.base is not None:
                self.check_entry(name, obj)
            if isinstance(obj, type) and hasattr(obj, "name"):
                obj.name = name  # attacks and defenses know their registered name
            self._entries[name] = obj
            return obj

        return add

    def _entry_point(self, name: str):
        if self.entry_point_group is None:
            return None
        return next((ep for ep in plugin_entry_points(self.entry_point_group) if ep.name == name), None)

    def __contains__(self, name: str) -> bool:
        load_builtins()
        return name in self._entries or self._entry_point(name) is not None

    def get(self, name: str) -> T:
        """The entry called ``name``; loads an entry-point plugin on first use."""
        load_builtins()
        if name not in self._entries:
            ep = self._entry_point(name)
            if ep is not None:
                loaded = ep.load()
                if self.base is not None:
                    self.check_entry(name, loaded)
                self._entries[name] = loaded
        if name not in self._entries:
            hint = "" if plugin_entry_points(BUILTINS_GROUP) else (
                " (no built-in plugins are installed: run `pip install -e .` in the repository)")
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}{hint}")
        return self._entries[name]

    def names(self) -> list[str]:
        """Built-in and already loaded names, plus installed entry-point names."""
        load_builtins()
        names = set(self._entries)
        if self.entry_point_group is not None:
            names.update(ep.name for ep in plugin_entry_points(self.entry_point_group))
        return sorted(names)


ATTACKS: Registry = Registry("attack", "fmfl.attacks", base="Attack")
DEFENSES: Registry = Registry("defense", "fmfl.defenses", base="Defense")
TRIGGERS: Registry = Registry("trigger", "fmfl.triggers")


def import_plugins(modules: list[str] | tuple[str, ...]) -> None:
    """Import user modules (``--plugin``) so that their registrations run."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - whatever a plugin raises on import is the plugin's error
            raise ImportError(f"--plugin {module!r} could not be imported: {type(err).__name__}: {err}") from err
