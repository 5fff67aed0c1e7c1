"""Loading and validating a cell config: YAML file + ``key=value`` overrides -> a :class:`CellConfig` whose
every rule that spans fields, every registry name, the dataset's facts, the device and the plugins'
parameters are checked before any compute. The dataclasses themselves live in :mod:`fl_core.schema`."""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
from pathlib import Path

from fl_core.configfile import apply_override, check_overrides, deep_merge, load_yaml
from fl_core.schema import SETTINGS, CellConfig, ConfigError, ModelSpec, check, check_param_types, from_dict
from fl_core.tracking import missing_module


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None) -> CellConfig:
    """YAML file (optional) + ``key=value`` overrides -> a resolved, validated CellConfig."""
    data = copy.deepcopy(base or {})  # overrides edit nested sections in place: never the caller's
    if path is not None:
        data = deep_merge(data, load_yaml(path))
    check_overrides(overrides)
    for item in overrides:
        apply_override(data, item)
    cfg = from_dict(CellConfig, data)
    return validate(cfg)


def validate(cfg: CellConfig) -> CellConfig:
    """Resolve setting defaults and check every rule that spans fields, every registry name, the
    dataset's facts (read without decoding it), the device and the plugins' parameters, before any
    compute. Types, ranges and choices of single fields were checked when the config was built."""
    from fl_core import models, synthetic
    from fl_core.data import dataset_facts, resolve_cache_dir
    from fl_core.hooks import public_params
    from fl_core.plugins import registries

    reg = registries()

    missing = missing_module(cfg.runtime.logger)
    check(missing is None, "runtime.logger", f"{cfg.runtime.logger} needs the {missing!r} package: "
          "pip install 'fmfl-backdoor-bench[tracking]' (or runtime.logger: csv)")
    d = cfg.data
    check(bool(d.dataset) and "/" not in d.dataset, "data.dataset",
           "must be a name: one of cifar10, cifar100, fashion_mnist, mnist or an ImageFolder tree under the data root")
    try:
        facts = dataset_facts(d.dataset, cfg.runtime.data_root, cfg.runtime.cache_dir, d.download)
    except FileNotFoundError as err:
        raise ConfigError(f"data.dataset: {err}") from err
    client_pool = facts.train_size - d.public_size
    check(client_pool >= 1, "data.public_size",
           f"{d.public_size} leaves no client data of the {facts.train_size} {d.dataset} training images")
    check(d.client_pool_size is None or d.client_pool_size <= client_pool, "data.client_pool_size",
           f"{d.client_pool_size} > the {client_pool} training images left after data.public_size")
    check(d.test_size is None or d.test_size <= facts.test_size, "data.test_size",
           f"{d.test_size} > the {facts.test_size} test images of {d.dataset}")

    for i, spec in enumerate(cfg.model.specs()):
        key = f"model.prototypes[{i}]" if cfg.model.prototypes else "model"
        check(spec.name in models.MODELS or spec.name.startswith("timm:"), f"{key}.name",
               f"{spec.name!r} unknown; valid: {', '.join(models.MODELS.names())} or timm:<model name>")
        if not spec.name.startswith("timm:"):
            knobs = getattr(models.MODELS.get(spec.name), "knobs", None)  # None: a plugin that takes anything
            check(knobs is None or spec.depth is None or "depth" in knobs, f"{key}.depth",
                   f"model {spec.name!r} has no depth knob (it takes: {', '.join(knobs or ()) or 'none'})")
            check(knobs is None or not spec.options, f"{key}.options",
                   f"model {spec.name!r} takes no options (options are passed to timm models only)")

    s = cfg.synthetic
    check(s.provider in synthetic.PROVIDERS, "synthetic.provider",
           f"{s.provider!r} unknown; valid: {', '.join(synthetic.PROVIDERS.names())}")
    check(s.provider != "heldout" or s.size <= d.public_size, "synthetic.size",
           f"the heldout provider draws from the public pool: size {s.size} > data.public_size {d.public_size}")
    check(s.provider != "ddpm" or (s.ddpm.image_size or facts.shape[1]) % 4 == 0, "synthetic.ddpm.image_size",
           f"the UNet halves the resolution twice: {s.ddpm.image_size or facts.shape[1]} is not a multiple of 4")
    check(s.provider != "ddpm" or s.ddpm.guidance_scale == 0 or s.ddpm.train_uncond_prob > 0,
           "synthetic.ddpm.guidance_scale", "classifier-free guidance needs a model trained with train_uncond_prob > 0")
    check(s.provider != "diffusers" or bool(s.diffusers.pipeline), "synthetic.diffusers.pipeline",
           "the diffusers provider needs a pipeline path or hub id")
    cache_dir = resolve_cache_dir(cfg.runtime.cache_dir, cfg.runtime.data_root)
    check(not cache_dir.exists() or cache_dir.is_dir(), "runtime.cache_dir",
          f"{cache_dir} exists and is not a folder")
    if s.provider == "diffusers":
        _check_pipeline(s.diffusers.pipeline)

    f = cfg.fl
    if f.setting in SETTINGS:
        n, k = SETTINGS[f.setting]
        f.num_clients = f.num_clients if f.num_clients is not None else n
        f.clients_per_round = f.clients_per_round if f.clients_per_round is not None else min(k, f.num_clients)
    else:
        check(f.num_clients is not None and f.clients_per_round is not None, "fl",
               "setting 'custom' needs num_clients and clients_per_round")
    check(f.clients_per_round <= f.num_clients, "fl.clients_per_round", f"must be <= num_clients={f.num_clients}")
    check(f.fusion == "feddf" or len(cfg.model.specs()) == 1, "fl.fusion",
           "heterogeneous prototypes can only be fused by distillation (feddf)")
    pool = d.client_pool_size or client_pool
    check(d.min_samples * f.num_clients <= pool, "data.min_samples",
           f"{d.min_samples} per client x {f.num_clients} clients > the {pool} client-pool images")
    check(d.partition != "shards" or d.shards_per_client * f.num_clients <= pool, "data.shards_per_client",
           f"{d.shards_per_client} x {f.num_clients} clients shards > the {pool} client-pool images")

    b = cfg.backdoor
    check(b.target < facts.classes, "backdoor.target", f"{b.target} is not a class of {d.dataset} (0-{facts.classes - 1})")
    check(b.mapping == "all-to-one" or b.source is not None, "backdoor.source", "one-to-one needs a source class")
    check(b.source is None or (b.source < facts.classes and b.source != b.target), "backdoor.source",
           f"{b.source} must be a class of {d.dataset} (0-{facts.classes - 1}) other than the target")
    try:
        trigger_cls = reg.triggers.get(b.trigger.kind)
    except KeyError as err:
        raise ConfigError(f"backdoor.trigger.kind: {err.args[0]}") from err
    b.trigger.params = check_param_types(trigger_cls, b.trigger.params, "backdoor.trigger.params")
    try:
        check_trigger_fits(trigger_cls, b.trigger.params, tuple(facts.shape))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"backdoor.trigger: {err}") from err
    check(len(cfg.defenses()) >= 1, "defense", "an empty list: name at least one defense (or {name: none})")
    many = isinstance(cfg.defense, list)
    named = [("attack", reg.attacks, cfg.attack)] + [
        (f"defense[{i}]" if many else "defense", reg.defenses, d) for i, d in enumerate(cfg.defenses())]
    for key, registry, plugin in named:
        try:
            cls = registry.get(plugin.name)
        except KeyError as err:
            raise ConfigError(f"{key}.name: {err.args[0]}") from err
        try:
            if hasattr(cls, "check_consumes"):
                cls.check_consumes()
        except ValueError as err:
            raise ConfigError(f"{key}.name: defense {plugin.name!r} {err}") from err
        params = check_param_types(cls, plugin.params, f"{key}.params")
        try:
            instance = cls(**params)
            instance.check(cfg)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key}.params: {err}") from err
        # every parameter explicit (defaults filled in), so equal cells hash equally
        plugin.params = public_params(instance, constructor_only=True)
        needs = getattr(instance, "requires_provider", None)
        check(needs is None or s.provider == needs, "synthetic.provider",
               f"{key} {plugin.name!r} queries the FM itself and needs provider {needs!r}, got {s.provider!r}")
        needs = getattr(instance, "requires_trigger", None)
        check(needs is None or b.trigger.kind == needs, "backdoor.trigger.kind",
               f"{key} {plugin.name!r} needs trigger kind {needs!r}, got {b.trigger.kind!r}")
    _check_device(cfg.runtime.device)
    check(cfg.precision != "16-mixed" or cfg.runtime.device.startswith("cuda") or (
        cfg.runtime.device == "auto" and _has_cuda()), "precision", "16-mixed needs a CUDA GPU; use bf16-mixed on a CPU")
    _check_memory(cfg, facts)
    return cfg


def not_applicable(cfg: CellConfig) -> str | None:
    """Why the cell's defense cannot apply to its models (a grid records such a cell as n/a; a single run
    refuses it before compute), or None."""
    from fl_core.plugins import registries

    defenses = registries().defenses
    for d in cfg.defenses():
        if getattr(defenses.get(d.name), "parameter_space", False) and len(cfg.model.specs()) > 1:
            return f"defense {d.name!r} compares parameters across clients and cannot apply to heterogeneous prototypes"
    return None


def check_ready(cfg: CellConfig) -> None:
    """What a validated cell needs on disk before it can run (checked by ``run`` and ``grid`` before any
    compute; ``benchmarks.fm prepare`` makes it): a ddpm provider's trained model, or its synthetic set
    already in the cache."""
    from fl_core.data import resolve_cache_dir
    from fl_core.synthetic import cached_for, ddpm_folder_of

    s = cfg.synthetic
    if s.provider != "ddpm":
        return
    cache_dir = resolve_cache_dir(cfg.runtime.cache_dir, cfg.runtime.data_root)
    folder = ddpm_folder_of(s.ddpm, cfg.data.dataset, cfg.data.public_size, cache_dir)
    key = "synthetic.ddpm.weights" if s.ddpm.weights else "synthetic.provider"
    check((folder / "unet").is_dir() or cached_for(s, cfg.data.dataset, cfg.seed, cache_dir), key,
          f"no trained DDPM at {folder}; train it first with `python -m benchmarks.fm prepare --preset <grid>` "
          "(or `python -m benchmarks.fm train-ddpm --config <cell config>`)")


def _check_pipeline(pipeline: str) -> None:
    """A diffusers pipeline is a local folder with a model_index.json or a hub id (``owner/name``)."""
    path = Path(pipeline).expanduser()
    if path.exists() or pipeline.startswith((".", "/", "~")):
        check((path / "model_index.json").is_file(), "synthetic.diffusers.pipeline",
              f"{pipeline} is not a diffusers pipeline folder (no model_index.json)")
    else:
        check(re.fullmatch(r"[\w.-]+/[\w.-]+", pipeline) is not None, "synthetic.diffusers.pipeline",
              f"{pipeline!r} is neither a local pipeline folder nor a hub id of the form owner/name")


_FITTING_TRIGGERS: set[tuple] = set()


def check_trigger_fits(trigger_cls: type, params: dict, shape: tuple[int, ...]) -> None:
    """Apply the trigger to a blank image of ``shape``; a trigger that does not fit raises. A trigger that
    fitted is remembered (by class, parameters and shape): a grid repeats each draw's trigger under every
    defense, and one probe of the ``bpp`` trigger's dithering costs about 0.1 s."""
    from fl_core.data import apply_trigger, bind_trigger_pool

    key = (trigger_cls, json.dumps(params, sort_keys=True, default=str), shape)
    if key in _FITTING_TRIGGERS:
        return
    probe = torch_zeros(shape)
    trigger = trigger_cls(**params)
    bind_trigger_pool(trigger, probe)
    apply_trigger(trigger, probe, probe.new_zeros(1).long())
    _FITTING_TRIGGERS.add(key)


def torch_zeros(shape: tuple[int, ...]):
    """One black uint8 image of ``shape`` (C, H, W), batched: a probe for triggers."""
    import torch

    return torch.zeros((1, *shape), dtype=torch.uint8)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_device(device: str) -> None:
    import torch

    if device in ("auto", "cpu"):
        return
    if device == "mps":
        check(torch.backends.mps.is_available(), "runtime.device", "mps is not available on this machine")
        return
    kind, _, index = device.partition(":")
    check(kind == "cuda" and (index == "" or index.isdigit()), "runtime.device",
           f"{device!r} unknown; valid: auto, cpu, cuda, cuda:N, mps")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    check(count > 0, "runtime.device", f"{device!r} requested but this machine has no usable CUDA GPU; use auto or cpu")
    check(index == "" or int(index) < count, "runtime.device", f"{device!r}: this machine has {count} GPU(s)")


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else a generous 64 GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 64 << 30


@functools.lru_cache(maxsize=None)
def _parameter_count(spec_json: str, channels: int, classes: int) -> int:
    """Parameters of a model spec, built on the meta device (no memory), once per spec and process."""
    import torch

    from fl_core.models import build_model

    with torch.device("meta"):
        model = build_model(ModelSpec(**json.loads(spec_json)), channels, classes, (0.0,), (1.0,))
    return sum(p.numel() for p in model.parameters())


def _check_memory(cfg: CellConfig, facts) -> None:
    """Refuse a cell whose model copies (clients, teachers, optimiser state) would not fit in memory."""
    if any(spec.name.startswith("timm:") for spec in cfg.model.specs()):
        return  # timm models are not built twice just to count them
    params = max(_parameter_count(json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str), facts.shape[0],
                                  facts.classes) for spec in cfg.model.specs())
    need = params * 4 * (cfg.fl.clients_per_round + 6)  # one model per client kept, global, grads, Adam state
    have = available_memory_bytes()
    check(need <= have, "model", f"{params:,} parameters x {cfg.fl.clients_per_round + 6} copies need "
           f"~{need / 2**30:.1f} GiB; this machine has {have / 2**30:.1f} GiB available (model.width?)")
