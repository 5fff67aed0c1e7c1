"""The FM-integrated FL loop of [P1]: pre-train on synthetic data, local training, FedAvg, ensemble distillation.

``run_cell(cfg)`` runs one experiment cell and returns a tidy record (config, final metrics,
per-round curves, timings, versions); ``prepare(cfg)`` builds the data side only.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn

from fl_core.config import CellConfig
from fl_core.data import (Dataset, ImageData, load_dataset, partition, resolve_data_root, stratified_split,
                          training_loader)
from fl_core.hooks import ClientUpdate, FusionPlan, ServerContext, State
from fl_core.metrics import backdoor_test_set, evaluate
from fl_core.models import build_model
from fl_core.modules import FusionModule, SupervisedModule, ensemble_outputs, fit
from fl_core.seeding import derive_seed, numpy_rng
from fl_core.storage import load_tensors, save_tensors, tensor_digest, write_json
from fl_core.synthetic import SyntheticRequest, synthetic_set


class DivergedError(RuntimeError):
    """Training produced non-finite parameters or metrics."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device asks for CUDA but no GPU is available")
    return device


@dataclass
class Setup:
    """The data side of a cell: dataset, client shards, public pool and where things run."""

    cfg: CellConfig
    dataset: Dataset
    clients: list[ImageData]
    public: ImageData
    test: ImageData
    device: torch.device
    cache_dir: Path

    @property
    def accelerator(self) -> str:
        return "gpu" if self.device.type == "cuda" else "cpu"

    def synthetic_request(self) -> SyntheticRequest:
        return SyntheticRequest(self.cfg.synthetic, self.dataset, self.public, self.cfg.seed, self.cache_dir,
                                self.device)


def prepare(cfg: CellConfig) -> Setup:
    """Load the dataset, carve the public pool, subsample, partition the client pool (all seeded)."""
    rt = cfg.runtime
    torch.set_num_threads(rt.threads)  # fixed, not load-dependent: the last digits depend on it (fl_core/threads.py)
    root = resolve_data_root(rt.data_root)
    cache_dir = Path(rt.cache_dir) if rt.cache_dir else root / "cache"
    ds = load_dataset(cfg.data.dataset, root, cache_dir, cfg.data.download)
    d = cfg.data  # sizes and classes were checked against the dataset's facts by config.validate
    client_idx, public_idx = stratified_split(ds.train.labels, d.public_size, cfg.seed, "public")
    pool = ds.train.subset(client_idx)
    if d.client_pool_size is not None and d.client_pool_size < len(pool):
        _, keep = stratified_split(pool.labels, d.client_pool_size, cfg.seed, "client-pool")
        pool = pool.subset(keep)
    test = ds.test
    if d.test_size is not None and d.test_size < len(test):
        _, keep = stratified_split(test.labels, d.test_size, cfg.seed, "test")
        test = test.subset(keep)
    parts = partition(pool.labels.numpy(), cfg.fl.num_clients, d.partition, beta=d.beta,
                      shards_per_client=d.shards_per_client, min_samples=d.min_samples, seed=cfg.seed)
    device = resolve_device(rt.device)
    clients = [pool.subset(p).to(device) for p in parts]
    return Setup(cfg, ds, clients, ds.train.subset(public_idx), test, device, cache_dir)


def fedavg(states: list[State], weights: list[float]) -> State:
    """Weighted mean of floating-point entries; integer buffers (BN counters) from the first state."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            stacked = torch.stack([s[key].double() for s in states])
            out[key] = torch.einsum("n,n...->...", w.to(stacked.device), stacked).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def sample_clients(num_clients: int, per_round: int, seed: int, round_idx: int) -> list[int]:
    """The clients of ``round_idx`` (sorted), a seeded draw without replacement."""
    if per_round >= num_clients:
        return list(range(num_clients))
    return sorted(numpy_rng(seed, "sample", round_idx).choice(num_clients, per_round, replace=False).tolist())


def versions() -> dict:
    import lightning
    import torchvision

    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "lightning": lightning.__version__, "git_commit": commit, "platform": platform.platform()}


def _check_finite(model: nn.Module, what: str) -> None:
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise DivergedError(f"{what}: parameter {name} is not finite")


class _Timer:
    """Accumulates seconds spent inside ``with timer():`` blocks."""

    def __init__(self):
        self.seconds = 0.0

    @contextmanager
    def __call__(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start


class StageCache:
    """Outputs of training stages that cells share (``<cache>/stages/<key>.pt``), keyed by a hash of
    exactly what determines them: every input tensor's content and every setting the stage reads. A
    defense, the rounds or the fusion settings do not enter the pre-training key, so the cells of a
    grid that differ only there pre-train once; round 1's client training is shared the same way
    while the defense leaves the broadcast model alone (``Defense.changes_broadcast``). Writes are
    atomic (safe under two runners)."""

    def __init__(self, folder: Path | None):
        self.folder = folder  # None: disabled

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def load(self, key: str) -> dict | None:
        return load_tensors(self.folder / f"{key}.pt") if self.folder is not None else None

    def save(self, key: str, blob: dict) -> None:
        if self.folder is not None:
            save_tensors(self.folder / f"{key}.pt", blob)


def data_digest(data: ImageData) -> str:
    """Content hash of a labelled set, including which samples carry a pasted trigger."""
    mask = data.stamped.mask if data.stamped is not None else torch.zeros(0, dtype=torch.bool)
    return tensor_digest(data.images, data.labels, mask)


def model_digest(models: list[nn.Module]) -> str:
    return tensor_digest(*[v for m in models for v in m.state_dict().values()])


def cpu_state(model: nn.Module) -> State:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def training_settings(cfg: CellConfig, device: torch.device) -> list:
    """What every training stage of a cell reads besides its data: seed, precision, device kind, CPU threads
    (they change the last digits), augmentation, trigger."""
    return [cfg.seed, cfg.precision, device.type, cfg.runtime.threads, cfg.data.augment, dataclasses.asdict(cfg.backdoor)]


def stamp_trigger(data: ImageData):
    """The trigger that augmentation must paste again on ``data``'s stamped samples (None: none)."""
    return data.stamped.trigger if data.stamped is not None else None


def initial_models(cfg: CellConfig, setup: Setup) -> list[nn.Module]:
    """One freshly initialised global model per prototype, each seeded from the config, on the device."""
    ds = setup.dataset
    models = []
    for p, spec in enumerate(cfg.model.specs()):
        torch.manual_seed(derive_seed(cfg.seed, "init", p))
        models.append(build_model(spec, ds.image_shape[0], ds.num_classes, ds.mean, ds.std).to(setup.device))
    return models


def pretrain(models: list[nn.Module], data: ImageData, cfg: CellConfig, setup: Setup, cache: StageCache) -> None:
    """Pre-train every global model on the (possibly poisoned) synthetic set, if the config asks for it;
    reused from the stage cache when the same initial models met the same data and settings before."""
    if not (cfg.pretrain.enabled and cfg.pretrain.epochs > 0):
        return
    key = cache.key("pretrain", model_digest(models), data_digest(data), dataclasses.asdict(cfg.pretrain),
                    training_settings(cfg, setup.device))
    blob = cache.load(key)
    if blob is not None:
        for model, state in zip(models, blob["models"]):
            model.load_state_dict(state)
        return
    for p, model in enumerate(models):
        loader = training_loader(data, cfg.pretrain.optim.batch_size, derive_seed(cfg.seed, "pre", p), cfg.data.augment)
        fit(SupervisedModule(model, cfg.pretrain.optim, cfg.data.augment, derive_seed(cfg.seed, "pre-aug", p),
                             stamp_trigger(data)),
            loader, setup.accelerator, max_epochs=cfg.pretrain.epochs, precision=cfg.precision)
        _check_finite(model, "pre-training")
    cache.save(key, {"models": [cpu_state(m) for m in models]})


def run_cell(cfg: CellConfig, out_dir: str | os.PathLike | None = None, log=print) -> dict:
    """Run one experiment cell; writes ``record.json`` and ``models/`` under ``out_dir`` if given."""
    import attacks
    import defenses

    started = time.time()
    L.seed_everything(cfg.seed, verbose=False)
    setup = prepare(cfg)
    device, seed, acc = setup.device, cfg.seed, setup.accelerator
    attack = attacks.ATTACKS.get(cfg.attack.name)(**cfg.attack.params)
    defense = defenses.DEFENSES.get(cfg.defense.name)(**cfg.defense.params)
    trigger = attacks.make_trigger(cfg.backdoor.trigger)
    specs = cfg.model.specs()
    n_clients, n_protos = cfg.fl.num_clients, len(specs)
    if defense.parameter_space and n_protos > 1:
        raise NotImplementedError(f"defense {cfg.defense.name!r} compares parameters across clients and "
                                  "cannot apply to heterogeneous prototypes")

    request = setup.synthetic_request()
    attack.bind(cfg.backdoor, trigger, fm=request)
    synthetic, manifest = synthetic_set(request)
    syn = {stage: attack.poison_synthetic(synthetic, stage, seed).to(device) for stage in ("pretrain", "fusion")}
    malicious = sorted(set(attack.malicious_clients(n_clients, seed)))
    clients = [attack.poison_client_data(i, d, seed) if i in malicious else d for i, d in enumerate(setup.clients)]
    proto_of = [i % n_protos for i in range(n_clients)]
    proto_clients = [proto_of.count(p) for p in range(n_protos)]
    k = setup.dataset.num_classes

    models = initial_models(cfg, setup)

    backdoor_set = backdoor_test_set(setup.test, cfg.backdoor, trigger, seed)
    rounds: list[dict] = []

    def record_round(r: int, seconds: float, defense_seconds: float) -> dict:
        per_proto = [evaluate(m, setup.test, backdoor_set, cfg.eval.batch_size, device) for m in models]
        w = np.array(proto_clients, dtype=float) / n_clients
        row = {"round": r, **{m: float(sum(wi * pm[m] for wi, pm in zip(w, per_proto))) for m in ("acc", "asr", "ra")},
               "seconds": seconds, "defense_seconds": defense_seconds}
        if n_protos > 1:
            row["prototypes"] = per_proto
        if not all(math.isfinite(row[m]) for m in ("acc", "asr", "ra")):
            raise DivergedError(f"round {r}: non-finite metrics {row}")
        rounds.append(row)
        return row

    cache = StageCache(setup.cache_dir / "stages" if cfg.runtime.stage_cache else None)
    t0 = time.perf_counter()
    pretrain(models, syn["pretrain"], cfg, setup, cache)
    pre = record_round(0, time.perf_counter() - t0, 0.0)
    log(f"[{cfg.key()}] pre-training done: acc {pre['acc']:.2f} asr {pre['asr']:.2f}")

    bar = _progress(cfg)
    for r in range(1, cfg.fl.rounds + 1):
        t_round, d_time, local_time, fusion_time = time.perf_counter(), _Timer(), _Timer(), _Timer()
        ctx = ServerContext(round=r, seed=seed, device=device, num_classes=k, synthetic=syn["fusion"],
                            num_prototypes=n_protos, rounds=cfg.fl.rounds)
        updates: list[ClientUpdate] = []
        with d_time():
            for p, model in enumerate(models):
                defense.before_round(model, p, ctx)
        selected = attack.select_clients(sample_clients(n_clients, cfg.fl.clients_per_round, seed, r), r,
                                         n_clients, seed)
        epochs = {cid: attack.local_epochs(cid, cfg.fl.local_epochs) if cid in malicious else cfg.fl.local_epochs
                  for cid in selected}
        round_key = cache.key("clients", r, model_digest(models), selected, [data_digest(clients[c]) for c in selected],
                              epochs, malicious, attack.describe(), dataclasses.asdict(cfg.fl.client),
                              training_settings(cfg, device)) if r == 1 and not defense.changes_broadcast(r) else None
        trained = (cache.load(round_key) if round_key else None) or {}
        fresh = {}
        for cid in selected:
            p = proto_of[cid]
            local = copy.deepcopy(models[p])
            data = clients[cid]
            # asked even when cached: an attack may track the rounds it saw (Neurotoxin's mask)
            callbacks = attack.training_callbacks(cid, models[p], ctx) if cid in malicious else None
            if f"client{cid}" in trained:
                local.load_state_dict(trained[f"client{cid}"])
                local.train()
            else:
                loader = training_loader(data, cfg.fl.client.batch_size, derive_seed(seed, "local", r, cid),
                                         cfg.data.augment)
                with local_time():
                    fit(SupervisedModule(local, cfg.fl.client, cfg.data.augment, derive_seed(seed, "aug", r, cid),
                                         stamp_trigger(data)),
                        loader, acc, max_epochs=epochs[cid], callbacks=callbacks, precision=cfg.precision)
                if round_key:
                    fresh[f"client{cid}"] = cpu_state(local)
            update = ClientUpdate(cid, p, len(data), local)
            if cid in malicious:
                update = attack.poison_update(update, models[p], ctx)
            with d_time():
                update = defense.filter_update(update, models[p], ctx)
            if update is not None:
                updates.append(update)
        if round_key and fresh:
            cache.save(round_key, {**trained, **fresh})
        for p, model in enumerate(models):
            mine = [u for u in updates if u.prototype == p]
            if mine:
                with d_time():
                    state = defense.aggregate(mine, model, ctx)
                if state is None:
                    state = fedavg([u.state() for u in mine], [u.num_samples for u in mine])
                model.load_state_dict(state)
            if cfg.fl.fusion == "feddf" and updates and cfg.fusion.steps > 0:
                plan = FusionPlan(p, list(updates), torch.ones(len(updates)), syn["fusion"])
                with d_time():
                    plan = defense.on_fusion(plan, model, ctx)
                if plan.teachers:
                    teachers = [u.model for u in plan.teachers]
                    with fusion_time():
                        targets = None if cfg.fusion.augment else ensemble_outputs(teachers, plan.teacher_weights,
                                                                                   plan.synthetic.images)
                        loader = training_loader(plan.synthetic, cfg.fusion.optim.batch_size,
                                                 derive_seed(seed, "fusion", r, p), cfg.fusion.augment,
                                                 steps=cfg.fusion.steps, targets=targets)
                        module = FusionModule(model, teachers, plan.teacher_weights, cfg.fusion,
                                              derive_seed(seed, "fusion-aug", r, p), trigger=stamp_trigger(plan.synthetic))
                        fit(module, loader, acc, callbacks=plan.callbacks, precision=cfg.precision)
            with d_time():
                models[p] = defense.after_round(model, p, ctx)
            _check_finite(models[p], f"round {r}")
        seconds = time.perf_counter() - t_round
        if r % cfg.eval.every == 0 or r == cfg.fl.rounds:
            row = record_round(r, seconds, d_time.seconds)
            row.update(local_seconds=local_time.seconds, fusion_seconds=fusion_time.seconds,
                       malicious_selected=[c for c in selected if c in malicious])
            bar.set_postfix(acc=f"{row['acc']:.1f}", asr=f"{row['asr']:.1f}")
        bar.update(1)
    bar.close()

    final = rounds[-1]
    record = {
        "key": cfg.key(),
        "config": cfg.to_dict(with_runtime=False),
        "attack": attack.describe(),
        "defense": defense.describe(),
        "metrics": {m: final[m] for m in ("acc", "asr", "ra")},
        "prototype_metrics": final.get("prototypes"),
        "rounds": rounds,
        "malicious_clients": malicious,
        "client_sizes": [len(c) for c in setup.clients],
        "synthetic": {k_: manifest[k_] for k_ in ("provider", "size", "content_sha256")},
        "dataset_source": setup.dataset.source,
        "wall_seconds": time.time() - started,
        "train_seconds": time.perf_counter() - t0,
        "defense_seconds": float(sum(r_.get("defense_seconds", 0.0) for r_ in rounds)),
        "device": str(device),
        "versions": versions(),
    }
    if out_dir is not None:
        save_cell(record, models, Path(out_dir), defense.state_dict())
    return record


def _progress(cfg: CellConfig):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.fl.rounds, desc=f"cell {cfg.key()}", unit="round", disable=not cfg.runtime.progress,
                leave=False)


def save_cell(record: dict, models: list[nn.Module], out_dir: Path, defense_state: dict | None = None) -> None:
    """Write the final global model(s), the defense's learned state and ``record.json`` (last, atomically:
    its presence means done)."""
    for p, model in enumerate(models):
        save_tensors(out_dir / "models" / f"prototype{p}.pt", cpu_state(model))
    if defense_state:
        save_tensors(out_dir / "models" / "defense.pt", {k: v.cpu() for k, v in defense_state.items()})
    write_json(out_dir / "record.json", record)
