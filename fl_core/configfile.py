"""Config text read strictly: YAML 1.2 scalars (``010`` is ten, ``1e-3`` a number, ``yes`` / ``on`` text,
no octal or sexagesimal surprises), a key given twice in one mapping refused, empty or binary files
refused, ``--set`` overrides that merge into a section as grid axes do and may name a key once."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from fl_core.schema import ConfigError


class StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars and duplicate keys refused."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


StrictLoader.yaml_implicit_resolvers = {k: [r for r in v if r[0] not in (
    "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                   list("-+0123456789"))
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))


def _int(loader, node):
    text = loader.construct_scalar(node)
    if text.startswith(("0o", "0x")):
        return int(text, 0)
    return int(text)  # leading zeros are decimal in YAML 1.2


StrictLoader.add_constructor("tag:yaml.org,2002:int", _int)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> data; a syntax error or a repeated key is a ConfigError naming ``where``."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}".replace('"<unicode string>", ', "")) from err


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing, unreadable, binary, empty or non-mapping file is a ConfigError."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8)") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
    data = parse_yaml(text, str(path))
    if data is None:
        raise ConfigError(f"{path}: the file is empty; a config file holds a mapping of sections")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def deep_merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; values of ``update`` win. The result shares no dict or list with either input,
    so editing it in place (as overrides and grid axes do) never changes a caller's preset or constant."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def override_key(assignment: str) -> str:
    """The dotted key of one ``key=value`` override (a ConfigError when it has no ``=``)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.sub=value")
    return assignment.split("=", 1)[0].strip()


def check_overrides(assignments: list[str] | tuple[str, ...]) -> None:
    """Each key may be set once: a second ``--set`` of a key (or of a key inside it) would silently win."""
    keys = [override_key(a) for a in assignments]
    for i, key in enumerate(keys):
        for other in keys[:i]:
            if key == other or key.startswith(other + ".") or other.startswith(key + "."):
                raise ConfigError(f"override {key!r} is given twice (also as {other!r}); set each key once")


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``dotted.key=value`` override (value parsed as YAML 1.2) to nested dicts in place; a
    mapping value merges into the section it names (as grid axes do) instead of replacing it."""
    key = override_key(assignment)
    raw = assignment.split("=", 1)[1]
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a section")
    value = parse_yaml(raw, f"override {assignment!r}")
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        value = deep_merge(node[parts[-1]], value)
    node[parts[-1]] = value
