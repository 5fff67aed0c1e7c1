"""Typed experiment configuration: the dataclasses of a cell, built from plain data and hashed.

One *cell* of a benchmark grid is a :class:`CellConfig`. Everything that changes a
result is part of the config and of its hash; :class:`RuntimeConfig` (paths, device,
threads) is not, so the same cell run on another machine keeps its key.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type or an impossible value."""


# ---------------------------------------------------------------- declarative field types
# Every field's type says what it accepts (pydantic validates the dataclasses below); rules that span
# fields, and names looked up in registries or dataset metadata, are checked in :func:`fl_core.config.validate`.


def _number(value: Any) -> Any:
    """Numbers as given; numeric strings parsed (YAML 1.1 reads ``1e-3`` as text); booleans refused."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    return value


def number(**bounds: float) -> Any:
    """A finite float within ``bounds`` (pydantic's gt / ge / lt / le); numeric text accepted."""
    return Annotated[float, Field(allow_inf_nan=False, **bounds), BeforeValidator(_number)]


Float = number()
PositiveFloat = number(gt=0)
Fraction = number(ge=0, le=1)
Int = Annotated[int, Strict()]
Count = Annotated[Int, Field(ge=1)]  # at least one
NonNegative = Annotated[Int, Field(ge=0)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
STRICT_KEYS = ConfigDict(extra="forbid")  # unknown keys are errors
# Lightning's precision names; YAML reads 32 as a number
Precision = Annotated[Literal["32", "bf16-mixed", "16-mixed"],
                      BeforeValidator(lambda v: str(v) if isinstance(v, int) and not isinstance(v, bool) else v)]
# generous ceilings that catch typos (1e5 for 1e-5) before they allocate or run for years
MAX_WIDTH = 64.0
MAX_ROUNDS = 100_000


@dataclass
class DataConfig:
    __pydantic_config__ = STRICT_KEYS
    dataset: Str = "cifar10"
    public_size: NonNegative = 10000  # disjoint public pool carved out of the training set (the FM's knowledge)
    client_pool_size: Count | None = None  # use only this many (stratified) client-pool images; None = all
    test_size: Count | None = None  # evaluate on a stratified subset of the test set; None = all
    partition: Literal["iid", "dirichlet", "shards"] = "iid"
    beta: PositiveFloat = 0.5  # Dirichlet concentration
    shards_per_client: Count = 2
    min_samples: Count = 10  # every client gets at least this many samples
    # random crop (pad 4) + horizontal flip, batched on the device; off as in the predecessors' recipe
    # ([P1] resizes and normalises only); when on, a poisoned sample keeps its whole trigger
    augment: Bool = False
    download: Bool = False  # let torchvision download a missing dataset (needs network)


@dataclass
class ModelSpec:
    __pydantic_config__ = STRICT_KEYS
    name: Str = "cnn"
    width: number(gt=0, le=MAX_WIDTH) = 1.0  # channel multiplier
    depth: Count | None = None  # model-specific depth knob (cnn: conv layers); None = model default
    options: dict[str, Any] = field(default_factory=dict)  # extra factory arguments (e.g. timm kwargs)


@dataclass
class ModelConfig(ModelSpec):
    # Heterogeneous FL: one global model per prototype; client i trains prototype i % len(prototypes).
    prototypes: list[ModelSpec] = field(default_factory=list)

    def specs(self) -> list[ModelSpec]:
        """The prototypes; a homogeneous config has exactly one."""
        if self.prototypes:
            return list(self.prototypes)
        return [ModelSpec(self.name, self.width, self.depth, dict(self.options))]


@dataclass
class DDPMConfig:
    """A class-conditional DDPM trained here on the public pool (the suite's own FM), sampled with DDIM.

    The defaults are the CPU-sized FM of the committed results (1.6 M parameters, 16 x 16, ~1 h on two
    cores; docs/REPRODUCTION.md); the grids' ``paper`` scales name a larger one. The FM is one fixed
    model for every cell seed (``train_seed``); the cell seed draws its samples."""
    __pydantic_config__ = STRICT_KEYS
    weights: Str | None = None  # folder of a trained model; None = the cache folder for this dataset/config
    train_seed: NonNegative = 0
    train_steps: Count = 3000
    train_batch: Count = 128
    train_lr: PositiveFloat = 5e-4
    train_uncond_prob: number(ge=0, lt=1) = 0.1  # label dropout: lets sampling use classifier-free guidance
    ema_decay: number(ge=0, lt=1) = 0.999  # the weights saved and sampled are this EMA (0 = the raw weights)
    base_channels: Count = 32
    image_size: Count | None = 16  # resolution the UNet works at (samples are resized); None = the dataset's
    sample_steps: Count = 50  # DDIM steps
    sample_batch: Count = 250
    guidance_scale: number(ge=0) = 0.0  # classifier-free guidance w: eps_c + w (eps_c - eps_u); 0 = conditional


@dataclass
class DiffusersConfig:
    __pydantic_config__ = STRICT_KEYS
    pipeline: Str | None = None  # local folder or hub id of a text-to-image pipeline
    prompt_template: Str = "a photo of a {label}"
    class_prompts: dict[str, str] = field(default_factory=dict)  # per-class override of the template
    steps: Count = 25
    guidance_scale: number(ge=0) = 7.5
    batch_size: Count = 8
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


@dataclass
class SyntheticConfig:
    __pydantic_config__ = STRICT_KEYS
    provider: Str = "heldout"  # heldout | ddpm | diffusers
    size: Count = 5000  # class balanced
    ddpm: DDPMConfig = field(default_factory=DDPMConfig)
    diffusers: DiffusersConfig = field(default_factory=DiffusersConfig)


@dataclass
class OptimConfig:
    """One training stage's optimiser; the defaults are [P1]'s client training (Adam 1e-3, batch 32)."""

    __pydantic_config__ = STRICT_KEYS
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: PositiveFloat = 1e-3
    momentum: number(ge=0, lt=1) = 0.0  # sgd only
    weight_decay: number(ge=0) = 0.0
    batch_size: Count = 32
    # constant | cosine (annealed to 0 over the stage's steps, per step); added after results were
    # published, so left out of the key at its default
    schedule: Literal["constant", "cosine"] = field(default="constant", metadata={"key_omits_default": True})


@dataclass
class FLConfig:
    __pydantic_config__ = STRICT_KEYS
    setting: Literal["cross-silo", "cross-device", "custom"] = "cross-silo"  # cross-silo: 10 clients, all
    num_clients: Count | None = None  # None = the setting's value
    clients_per_round: Count | None = None  # None = the setting's value
    rounds: Annotated[Count, Field(le=MAX_ROUNDS)] = 10
    local_epochs: Count = 3  # [P1]; the CPU scales use 1 (stated budget)
    fusion: Literal["fedavg", "feddf"] = "feddf"
    client: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class PretrainConfig:
    __pydantic_config__ = STRICT_KEYS
    enabled: Bool = True
    epochs: NonNegative = 3
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3))  # [P1]: Adam 2e-3, batch 32


@dataclass
class FusionConfig:
    __pydantic_config__ = STRICT_KEYS
    steps: NonNegative = 100  # fixed: there is no labelled validation set to stop on
    # weight of CE on the synthetic labels, 1 - alpha on the distillation KL; [P1] leaves it open, 0.25 was
    # chosen by attack-free ACC on the development seed 100 (docs/REPRODUCTION.md)
    alpha: Fraction = 0.25
    temperature: PositiveFloat = 1.0  # [P1]'s KD temperature
    augment: Bool = False
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(batch_size=64))


@dataclass
class TriggerConfig:
    __pydantic_config__ = STRICT_KEYS
    kind: Str = "patch"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class BackdoorConfig:
    """The trigger and target shared by every attack and by the ASR test set."""

    __pydantic_config__ = STRICT_KEYS
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    mapping: Literal["all-to-one", "one-to-one"] = "all-to-one"
    target: NonNegative = 0  # a class index (checked against the dataset's classes)
    source: NonNegative | None = None  # one-to-one only


@dataclass
class PluginConfig:
    __pydantic_config__ = STRICT_KEYS
    name: Str = "none"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    __pydantic_config__ = STRICT_KEYS
    every: Count = 1  # evaluate the global model(s) every N rounds (and always after the last)
    batch_size: Count = 1000


@dataclass
class RuntimeConfig:
    """Where and how to run; not part of the cell hash."""

    __pydantic_config__ = STRICT_KEYS
    device: Str = "auto"  # auto | cpu | cuda | cuda:N | mps
    data_root: Str | None = None  # None = $FMFL_DATA_ROOT or ./data
    cache_dir: Str | None = None  # None = <data_root>/cache
    # torch CPU threads per cell: results are bit-identical for the same config, seed and thread count;
    # grids run cells side by side instead (fl_core/threads.py)
    threads: Count = 1
    progress: Bool = True
    # reuse stage outputs (pre-trained models, round-1 client models) of other cells with the same inputs
    stage_cache: Bool = True
    # per-round metrics through a Lightning logger under <out>/logs (fl_core/tracking.py)
    logger: Literal["csv", "tensorboard", "mlflow", "none"] = "csv"


@dataclass
class CellConfig:
    __pydantic_config__ = STRICT_KEYS
    seed: NonNegative = 0
    # training precision of every Lightning stage (bf16-mixed: CPU AMX / GPU; 16-mixed: GPU); evaluation
    # stays fp32. Added after results were published: left out of the key at its default
    precision: Precision = field(default="32", metadata={"key_omits_default": True})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    fl: FLConfig = field(default_factory=FLConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    backdoor: BackdoorConfig = field(default_factory=BackdoorConfig)
    attack: PluginConfig = field(default_factory=PluginConfig)
    # one defense, or a list applied in order at every hook (fl_core.hooks.DefenseChain)
    defense: PluginConfig | list[PluginConfig] = field(default_factory=PluginConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self, with_runtime: bool = True, for_key: bool = False) -> dict[str, Any]:
        """Plain nested dicts; ``for_key`` leaves out fields marked ``key_omits_default`` at their default
        and puts a fixed placeholder where the settings of a provider the cell does not use were."""
        out = _plain(self, for_key)
        if for_key:
            for provider, placeholder in UNUSED_PROVIDER_KEY.items():
                if self.synthetic.provider != provider:
                    out["synthetic"][provider] = placeholder
            _key_plugin_params(out)
        if not with_runtime:
            out.pop("runtime")
        return out

    def defenses(self) -> list[PluginConfig]:
        """The defense configs in the order they apply (one for a single defense)."""
        return list(self.defense) if isinstance(self.defense, list) else [self.defense]

    def key(self) -> str:
        """Short content hash of everything that changes results (runtime excluded)."""
        canon = json.dumps(self.to_dict(with_runtime=False, for_key=True), sort_keys=True, default=str)
        return hashlib.sha256(canon.encode()).hexdigest()[:12]


def _key_plugin_params(out: dict[str, Any]) -> None:
    """In a key's dict, each registered plugin's parameters less those at their ``omit_at_default``
    (``fl_core.hooks.without_omitted``); the config itself keeps them, so that validating it again
    cannot swap a pinned old value for a newer class default."""
    from fl_core.hooks import without_omitted
    from fl_core.plugins import registries

    reg = registries()
    for section, registry in (("attack", reg.attacks), ("defense", reg.defenses)):
        for entry in out[section] if isinstance(out[section], list) else [out[section]]:
            if entry["name"] in registry:
                entry["params"] = without_omitted(registry.get(entry["name"]), entry["params"])


def _plain(obj: Any, for_key: bool) -> Any:
    """``dataclasses.asdict``; with ``for_key``, without the fields marked ``key_omits_default`` that hold
    their default, so a field added later keeps every earlier key (and its committed results) valid."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name), for_key) for f in dataclasses.fields(obj)
                if not (for_key and f.metadata.get("key_omits_default") and getattr(obj, f.name) == f.default)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, for_key) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v, for_key) for k, v in obj.items()}
    return obj


# The settings of a provider a cell does not use do not change its results; in its key they read as the
# defaults they had when the first results were published, so that changing a default keeps every key.
UNUSED_PROVIDER_KEY = {
    "ddpm": {"weights": None, "sample_steps": 50, "sample_batch": 250, "train_steps": 20000, "train_batch": 128,
             "train_lr": 2e-4, "base_channels": 64, "image_size": None},
    "diffusers": {"pipeline": None, "prompt_template": "a photo of a {label}", "class_prompts": {}, "steps": 25,
                  "guidance_scale": 7.5, "batch_size": 8, "dtype": "float32"},
}
SETTINGS = {"cross-silo": (10, 10), "cross-device": (100, 10)}


# ---------------------------------------------------------------- building from plain data


def _section(cls: type, loc: tuple) -> type | None:
    """The dataclass found by following ``loc`` (field names, list indices) from ``cls``."""
    node: Any = cls
    for part in loc:
        if isinstance(part, int):
            continue
        if not dataclasses.is_dataclass(node):
            return None
        hint = typing.get_type_hints(node, include_extras=False).get(part)
        args = [a for a in (typing.get_args(hint) or (hint,)) if a is not type(None)]
        node = next((a for a in args if dataclasses.is_dataclass(a)), None)
        if node is None and typing.get_origin(hint) is list:
            node = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)
    return node if dataclasses.is_dataclass(node) else None


def _explain(cls: type, err: ValidationError, where: str) -> ConfigError:
    """One readable line per problem, each naming its dotted key (unknown keys list the valid ones)."""
    lines = []
    for item in err.errors():
        loc = tuple(item["loc"])
        path = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[:-1])
        if item["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            parent = _section(cls, loc[:-1])
            valid = ", ".join(f.name for f in dataclasses.fields(parent)) if parent else "?"
            lines.append(f"{path}: unknown key(s) {loc[-1]}; valid keys: {valid}")
            continue
        if loc:
            path += f"[{loc[-1]}]" if isinstance(loc[-1], int) else f".{loc[-1]}"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "dataclass_type":
            message = "expected a mapping (a config section)"
        if item["type"] == "literal_error":
            message = message.replace("Input should be", "unknown; valid:")
        lines.append(f"{path}: {message}, got {item['input']!r}")
    return ConfigError("; ".join(lines))


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from nested dicts, validated by its field types (pydantic): unknown keys,
    wrong types and out-of-range values raise one ConfigError naming every offending key."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as err:
        raise _explain(cls, err, where) from None


@functools.lru_cache(maxsize=None)
def _adapter(cls: type) -> TypeAdapter:
    """One pydantic validator per config type (building it costs far more than a validation)."""
    return TypeAdapter(cls)


def config_schema() -> dict:
    """JSON Schema of a cell config (for editors and the docs): ``python -m benchmarks.run --schema``."""
    return _adapter(CellConfig).json_schema()






def check(cond: bool, key: str, why: str) -> None:
    """A ConfigError naming ``key`` and ``why`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(f"{key}: {why}")


SCALARS = {bool: Bool, int: Int, float: Float, str: Str}


def check_param_types(cls: type, params: dict[str, Any], where: str) -> dict[str, Any]:
    """``params`` checked against the scalar annotations (``int``, ``float``, ``bool``, ``str``, optionally
    ``| None``) of ``cls.__init__`` and its bases' before anything runs, numeric strings parsed; values of
    other annotations pass as given."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass):
            try:
                hints.update(typing.get_type_hints(vars(klass)["__init__"]))
            except (NameError, TypeError):  # an annotation that does not resolve: nothing to check
                continue
    checked = dict(params)
    for name, value in params.items():
        hint = hints.get(name)
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
        args = set(typing.get_args(hint)) - {type(None)} if optional else {hint}
        scalar = SCALARS.get(next(iter(args))) if len(args) == 1 else None
        if scalar is None or (optional and value is None):
            continue
        try:
            checked[name] = _adapter(scalar).validate_python(value)
        except ValidationError as err:
            raise ConfigError(f"{where}.{name}: {err.errors()[0]['msg'].removeprefix('Value error, ')}, "
                              f"got {value!r}") from None
    return checked
