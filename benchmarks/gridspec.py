"""Grid files and their expansion into cells: presets, scales, axes (a ``zoo`` axis among them), ``exclude``
and ``include`` rules, ``--only`` filters and ``--set`` overrides; every cell validated before any runs."""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from benchmarks import zoo
from benchmarks.cli import CONFIG_DIR
from fl_core.config import validate
from fl_core.configfile import apply_override, check_overrides, deep_merge, load_yaml, override_key
from fl_core.schema import CellConfig, ConfigError, from_dict

GRID_DIR = CONFIG_DIR / "grids"
GRID_KEYS = ("description", "base", "scales", "axes", "exclude", "include")


@dataclass
class Cell:
    """One resolved grid cell: its config, the axis labels that name it, and its key."""

    config: CellConfig
    labels: dict[str, str]

    @property
    def key(self) -> str:
        return self.config.key()


@dataclass
class GridSpec:
    name: str
    description: Annotated[str, Strict()] = ""
    base: dict = field(default_factory=dict)
    scales: dict[str, dict] = field(default_factory=dict)
    axes: dict[str, list] = field(default_factory=dict)
    exclude: list[dict] = field(default_factory=list)
    include: list[dict] = field(default_factory=list)


DEV_GRID_DIR = GRID_DIR / "dev"  # development grids (selections, probes): runnable by name, listed apart


def presets(folder: Path = GRID_DIR) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class GridFile:
    """The shape of a grid YAML file (types checked by pydantic before anything is expanded)."""

    description: Annotated[str, Strict()] = ""
    base: dict | str = field(default_factory=dict)  # a cell config, or a cell YAML's file name
    scales: dict[str, dict | None] | str = field(default_factory=dict)  # or another grid file's name
    axes: dict[str, Annotated[list, Field(min_length=1)]] = field(default_factory=dict)
    exclude: list[dict] = field(default_factory=list)
    include: list[dict] = field(default_factory=list)


def load_grid(path: str | Path) -> GridSpec:
    """Read a grid YAML; ``base`` may name a cell YAML (relative to the grid file or configs/)."""
    path = Path(path)
    raw = {k: v for k, v in load_yaml(path).items() if v is not None}
    try:
        grid = TypeAdapter(GridFile).validate_python(raw)
    except ValidationError as err:
        problems = [f"{'.'.join(str(p) for p in e['loc'] if '[' not in str(p)) or 'top level'}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{path}: " + "; ".join(problems) + f"; valid keys: {', '.join(GRID_KEYS)}") from None
    base = grid.base
    if isinstance(base, str):
        candidates = [path.parent / base, CONFIG_DIR / base]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(f"{path}: base config {base!r} not found (looked at {', '.join(map(str, candidates))})")
        base = load_yaml(found)
    scales = grid.scales
    if isinstance(scales, str):  # reuse the scales of another grid file: beside this one, else a preset
        candidates = [path.parent / scales, GRID_DIR / scales]
        other = next((c for c in candidates if c.is_file()), None)
        if other is None:
            raise ConfigError(f"{path}: scales {scales!r} names no grid file (looked at "
                              f"{', '.join(map(str, candidates))})")
        scales = load_grid(other).scales
    spec = GridSpec(path.stem, grid.description, base, {k: v or {} for k, v in scales.items()}, grid.axes,
                    grid.exclude, grid.include)
    check_rules(spec, path)
    return spec


def check_rules(spec: GridSpec, where: Path | str) -> None:
    """Every ``exclude`` / ``include`` key must be an axis or a cell config key: a misspelled key would
    silently match nothing."""
    if zoo.AXIS in spec.axes and "seed" in spec.axes:
        raise ConfigError(f"{where}: a zoo draw fixes its cell's seed; drop the 'seed' axis beside 'zoo'")
    if spec.include and zoo.AXIS in spec.axes:
        raise ConfigError(f"{where}: 'include' cells cannot be combined with a 'zoo' axis")
    known = config_keys()
    free = [k for k in known if k.rsplit(".", 1)[-1] in FREE_MAPPINGS]  # their keys are a plugin's own
    for kind, rules in (("exclude", spec.exclude), ("include", spec.include)):
        for rule in rules:
            for key in rule:
                if key not in spec.axes and key not in known and not any(key.startswith(k + ".") for k in free):
                    raise ConfigError(f"{where}: {kind} rule key {key!r} is neither an axis "
                                      f"({', '.join(spec.axes) or 'none'}) nor a cell config key")


FREE_MAPPINGS = ("params", "options", "class_prompts")  # config fields whose keys the config does not fix


def config_keys() -> set[str]:
    """Dotted names of every cell config field (a dict field's keys below it are free)."""
    out: set[str] = set()

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            out.add(prefix + k)
            if isinstance(v, dict) and v:
                walk(v, prefix + k + ".")

    walk(CellConfig().to_dict(), "")
    return out


def resolve_grid_path(preset: str | None, config: str | None) -> Path:
    if config:
        return Path(config)
    name = preset or "default"
    for folder in (GRID_DIR, DEV_GRID_DIR):
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(presets())}; development: "
                      f"{', '.join(presets(DEV_GRID_DIR))}")


def _get(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    old = node.get(parts[-1])
    node[parts[-1]] = deep_merge(old, value) if isinstance(value, dict) and isinstance(old, dict) else value


def label(value: Any) -> str:
    """A short readable name for an axis value: scalars as text, ``{name, params}`` as ``name(k=v)``, a list
    as its items' names joined by ``+``; a mapping may name itself with a ``label`` key (removed before it is applied)."""
    if isinstance(value, dict) and "label" in value:
        return str(value["label"])
    if isinstance(value, list):  # a defense chain
        return "+".join(label(v) for v in value)
    if isinstance(value, dict):
        name = value.get("name", value.get("kind"))
        rest = {k: v for k, v in value.items() if k not in ("name", "kind")}
        params = rest.pop("params", {}) or {}
        params.update(rest)
        inner = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
        if name is None:
            return inner or "default"
        return f"{name}({inner})" if inner else str(name)
    return str(value)


def _matches(rule: dict, cell_dict: dict, labels: dict[str, str]) -> bool:
    for key, want in rule.items():
        have_label = labels.get(key)
        if have_label is not None and have_label == label(want):
            continue
        if _get(cell_dict, key) != want:
            return False
    return True


def expand(spec: GridSpec, scale: str = "cpu", overrides: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> list[Cell]:
    """The cells of ``spec`` at ``scale`` that match every ``only`` filter (``axis=value``: axis by its full,
    first or last dotted name; ``axis=a|b`` matches either value), validated (errors name the cell) and
    deduplicated by key. Cells the filters leave out are not validated: their datasets need not be here."""
    if spec.scales and scale not in spec.scales:
        raise ConfigError(f"grid {spec.name!r} has no scale {scale!r}; valid: {', '.join(spec.scales)}")
    if not spec.scales and scale != "cpu":
        raise ConfigError(f"grid {spec.name!r} defines no scales; --scale {scale} would change nothing")
    filters = [_filter(item) for item in only]
    check_overrides(overrides)
    for key in map(override_key, overrides):
        hit = next((a for a in spec.axes if key == a or key.startswith(a + ".") or a.startswith(key + ".")), None)
        if hit is None and zoo.AXIS in spec.axes and any(key == k or key.startswith(k + ".") for k in zoo.SETS):
            hit = zoo.AXIS
        if hit is not None:
            raise ConfigError(f"--set {key} would overwrite the grid axis {hit!r} in every cell; "
                              f"select its values with --only {hit}=VALUE instead")
    base = deep_merge(spec.base, spec.scales.get(scale) or {})
    axes = {axis: zoo_values(values) if axis == zoo.AXIS else values for axis, values in spec.axes.items()}
    names = list(axes)
    combos = [dict(zip(names, values)) for values in itertools.product(*axes.values())] if names else [{}]
    combos += [dict(extra) for extra in spec.include]
    selected, passed = [], [[] for _ in filters]  # passed[i]: labels of the cells that pass filters 0..i-1
    for combo in combos:
        data = json.loads(json.dumps(base))
        for axis, value in combo.items():
            if axis != zoo.AXIS:
                _set(data, axis, {k: v for k, v in value.items() if k != "label"} if isinstance(value, dict) else value)
        draw = combo.get(zoo.AXIS)
        if draw is not None:  # a zoo draw sets several sections, after the other axes
            data = deep_merge(data, draw.overrides)
        for item in overrides:
            apply_override(data, item)
        if draw is not None and not zoo.allowed(draw, data):
            continue
        labels = {axis: value.label if axis == zoo.AXIS else label(value) for axis, value in combo.items()}
        if any(_matches(rule, data, labels) for rule in spec.exclude):
            continue
        for i, (key, wanted) in enumerate(filters):
            passed[i].append(labels)
            if not _hits(labels, key, wanted):
                break
        else:
            selected.append((data, labels))
    if not selected and filters:
        i = next(i for i, (key, wanted) in enumerate(filters) if not any(_hits(lab, key, wanted) for lab in passed[i]))
        axes = sorted({f"{a}={lab}" for labels in passed[i] for a, lab in labels.items()})
        raise ConfigError(f"--only {only[i]!r} matches no cell; axis values: {', '.join(axes)}")
    cells, seen = [], set()
    for data, labels in selected:
        try:
            cfg = validate(from_dict(CellConfig, data))
        except ConfigError as err:
            raise ConfigError(f"grid cell {labels}: {err}") from err
        if cfg.key() not in seen:
            seen.add(cfg.key())
            cells.append(Cell(cfg, labels))
    return cells


def zoo_values(values: list) -> list[zoo.Draw]:
    """The ``zoo`` axis's values, each a ``{zoo, draws, n, threat}`` spec, as the draws they name."""
    if not all(zoo.is_spec(v) for v in values):
        raise ConfigError("axis 'zoo': every value must be a mapping {zoo: all|<family>, draws: dev|test, n: N, "
                          "threat: fm|classic|clean}")
    return [d for v in values for d in zoo.expand_spec(v)]


def _filter(item: str) -> tuple[str, set[str]]:
    """``axis=a|b`` as (axis, {a, b})."""
    if "=" not in item:
        raise ConfigError(f"--only {item!r} must look like axis=value")
    key, value = item.split("=", 1)
    return key, set(value.split("|"))


def _hits(labels: dict[str, str], key: str, wanted: set[str]) -> bool:
    return any((axis == key or axis.split(".")[-1] == key or axis.split(".")[0] == key) and lab in wanted
               for axis, lab in labels.items())


# ---------------------------------------------------------------- status of a cell on disk
