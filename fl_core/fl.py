"""The FM-integrated FL loop of [P1]: pre-train on synthetic data, local training, FedAvg, ensemble distillation.

``run_cell(cfg)`` runs one experiment cell and returns a tidy record (config, final metrics,
per-round curves, timings, versions); ``prepare(cfg)`` builds the data side only.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import torch
from torch import nn

from fl_core.data import (
    Dataset,
    ImageData,
    bind_trigger_pool,
    load_dataset,
    resolve_cache_dir,
    resolve_data_root,
    training_loader,
)
from fl_core.hooks import Aggregation, ClientTraining, ClientUpdate, DefenseChain, FusionPlan, ServerContext
from fl_core.metrics import backdoor_test_set, client_detection, evaluate, sample_detection
from fl_core.models import build_model
from fl_core.modules import FusionModule, SupervisedModule, ensemble_outputs, fit, teacher_logits
from fl_core.partition import partition, stratified_split
from fl_core.plugins import Plugins, build_plugins
from fl_core.schema import CellConfig
from fl_core.seeding import derive_seed, numpy_rng
from fl_core.stages import StageCache, cpu_state, data_digest, model_digest, training_settings, versions
from fl_core.storage import save_tensors, tensor_digest, write_json
from fl_core.synthetic import SyntheticRequest, synthetic_set
from fl_core.tracking import flatten, log_round, round_logger
from fl_core.updates import fedavg_of


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
        return SyntheticRequest(self.cfg.synthetic, self.dataset.info(), self.public, self.cfg.seed, self.cache_dir,
                                self.device)


def prepare(cfg: CellConfig) -> Setup:
    """Load the dataset, carve the public pool, subsample, partition the client pool (all seeded)."""
    rt = cfg.runtime
    torch.set_num_threads(rt.threads)  # fixed, not load-dependent: the last digits depend on it (fl_core/threads.py)
    root = resolve_data_root(rt.data_root)
    cache_dir = resolve_cache_dir(rt.cache_dir, root)
    ds = load_dataset(cfg.data.dataset, root, cache_dir, cfg.data.download)
    d = cfg.data  # sizes and classes were checked against the dataset's facts by config.validate
    client_idx, public_idx = stratified_split(ds.train.labels, d.public_size, cfg.seed, "public")
    pool = ds.train.subset(client_idx)
    if d.client_pool_size is not None and d.client_pool_size < len(pool):
        _, keep = stratified_split(pool.labels, d.client_pool_size, cfg.seed, "client-pool")
        pool = pool.subset(keep)
    test = scored_test_set(ds.test, cfg)
    parts = partition(pool.labels.numpy(), cfg.fl.num_clients, d.partition, beta=d.beta,
                      shards_per_client=d.shards_per_client, min_samples=d.min_samples, seed=cfg.seed)
    device = resolve_device(rt.device)
    clients = [pool.subset(p).to(device) for p in parts]
    return Setup(cfg, ds, clients, ds.train.subset(public_idx), test, device, cache_dir)


def scored_test_set(test: ImageData, cfg: CellConfig) -> ImageData:
    """The test images a cell is scored on: ``data.test_size`` of them, stratified and seeded (all if None)."""
    size = cfg.data.test_size
    if size is None or size >= len(test):
        return test
    _, keep = stratified_split(test.labels, size, cfg.seed, "test")
    return test.subset(keep)


def sample_clients(pool: list[int], per_round: int, seed: int, round_idx: int) -> list[int]:
    """The clients of ``round_idx`` (sorted): a seeded draw without replacement from ``pool``."""
    if per_round >= len(pool):
        return sorted(pool)
    return sorted(np.asarray(pool)[numpy_rng(seed, "sample", round_idx).choice(len(pool), per_round,
                                                                                replace=False)].tolist())


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
    if blob is not None and len(blob.get("models", [])) == len(models):  # one pre-trained state per model
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


class FederatedRun:
    """One cell's FL run with constructed plugins; one method per stage of a round, in order:
    ``select_clients`` -> ``train_clients`` -> ``filter_updates`` -> ``aggregate`` -> ``fuse`` ->
    ``finish_round`` -> ``evaluate`` (docs/PLUGINS.md's hook table names which hook each stage calls)."""

    def __init__(self, cfg: CellConfig, setup: Setup, plugins: Plugins, log=print, tracker=None):
        self.cfg, self.setup, self.log, self.tracker = cfg, setup, log, tracker  # tracker: a Lightning logger
        self.attack, self.trigger = plugins.attack, plugins.trigger
        self.defense = plugins.defense if isinstance(plugins.defense, DefenseChain) else DefenseChain([plugins.defense])
        self.device, self.seed = setup.device, cfg.seed
        specs = cfg.model.specs()
        self.n_clients, self.n_protos = cfg.fl.num_clients, len(specs)
        if self.defense.parameter_space and self.n_protos > 1:
            raise NotImplementedError(f"defense {self.defense.name!r} compares parameters across clients and "
                                      "cannot apply to heterogeneous prototypes")
        request = setup.synthetic_request()
        bind_trigger_pool(self.trigger, setup.public.images)
        self.attack.bind(cfg.backdoor, self.trigger, fm=request)
        synthetic, self.manifest = synthetic_set(request)
        self.syn = {stage: self.attack.poison_synthetic(synthetic, stage, self.seed).to(self.device)
                    for stage in ("pretrain", "fusion")}
        fusion = self.syn["fusion"]
        self.server_synthetic = ImageData(fusion.images, fusion.labels, fusion.classes)  # what the server can see
        self.malicious = sorted(set(self.attack.malicious_clients(self.n_clients, self.seed)))
        self.clients = [self.attack.poison_client_data(i, d, self.seed) if i in self.malicious else d
                        for i, d in enumerate(setup.clients)]
        self.proto_of = [i % self.n_protos for i in range(self.n_clients)]
        self.models = initial_models(cfg, setup)
        self.backdoor_set = backdoor_test_set(setup.test, cfg.backdoor, self.trigger, self.seed)
        self.cache = StageCache.for_cell(cfg, setup.cache_dir)
        self.rounds: list[dict] = []
        self.timers = {name: _Timer() for name in ("defense", "local", "fusion")}

    def context(self, r: int) -> ServerContext:
        f = self.cfg.fl
        return ServerContext(round=r, seed=self.seed, device=self.device, num_classes=self.setup.dataset.num_classes,
                             synthetic=self.server_synthetic, num_prototypes=self.n_protos, rounds=f.rounds,
                             client_training=ClientTraining(f.client, f.local_epochs, self.cfg.data.augment),
                             pretraining=ClientTraining(self.cfg.pretrain.optim,
                                                        self.cfg.pretrain.epochs if self.cfg.pretrain.enabled else 0,
                                                        self.cfg.data.augment))

    def prototype_context(self, ctx: ServerContext, p: int) -> ServerContext:
        """With several prototypes, each prototype's hooks report into their own decision dict."""
        if self.n_protos == 1:
            return ctx
        return dataclasses.replace(ctx, decisions=ctx.decisions.setdefault(f"prototype{p}", {}))

    # ------------------------------------------------------------ stages of a round

    def select_clients(self, r: int, ctx: ServerContext) -> list[int]:
        """The defense's eligible clients, the seeded draw among them, the attack's adjustment."""
        with self.timers["defense"]():
            pool = self.defense.eligible_clients(list(range(self.n_clients)), ctx)
            for p, model in enumerate(self.models):
                self.defense.before_round(model, p, self.prototype_context(ctx, p))
        drawn = sample_clients(pool, self.cfg.fl.clients_per_round, self.seed, r)
        return self.attack.select_clients(drawn, r, self.n_clients, self.seed)

    def train_clients(self, r: int, selected: list[int], ctx: ServerContext) -> list[ClientUpdate]:
        """Local training of every selected client on a copy of its prototype's global model (round 1
        from the stage cache while the defense leaves the broadcast alone); malicious updates poisoned."""
        cfg, attack = self.cfg, self.attack
        epochs = {cid: attack.local_epochs(cid, cfg.fl.local_epochs) if cid in self.malicious else cfg.fl.local_epochs
                  for cid in selected}
        round_key = self.cache.key(
            "clients", r, model_digest(self.models), selected, [data_digest(self.clients[c]) for c in selected],
            epochs, self.malicious, attack.describe(), dataclasses.asdict(cfg.fl.client),
            training_settings(cfg, self.device)) if r == 1 and not self.defense.changes_broadcast(r) else None
        trained = (self.cache.load(round_key) if round_key else None) or {}
        fresh, updates = {}, []
        for cid in selected:
            p = self.proto_of[cid]
            local = copy.deepcopy(self.models[p])
            data = self.clients[cid]
            # asked even when cached: an attack may track the rounds it saw (Neurotoxin's mask)
            callbacks = attack.training_callbacks(cid, self.models[p], ctx) if cid in self.malicious else None
            if f"client{cid}" in trained:
                local.load_state_dict(trained[f"client{cid}"])
                local.train()
            else:
                loader = training_loader(data, cfg.fl.client.batch_size, derive_seed(self.seed, "local", r, cid),
                                         cfg.data.augment)
                with self.timers["local"]():
                    fit(SupervisedModule(local, cfg.fl.client, cfg.data.augment, derive_seed(self.seed, "aug", r, cid),
                                         stamp_trigger(data)),
                        loader, self.setup.accelerator, max_epochs=epochs[cid], callbacks=callbacks,
                        precision=cfg.precision)
                if round_key:
                    fresh[f"client{cid}"] = cpu_state(local)
            update = ClientUpdate(cid, p, len(data), local)
            if cid in self.malicious:
                update = attack.poison_update(update, self.models[p], ctx)
            updates.append(update)
        if round_key and fresh:
            self.cache.save(round_key, {**trained, **fresh})
        return updates

    def filter_updates(self, updates: list[ClientUpdate], ctx: ServerContext) -> list[ClientUpdate]:
        kept = []
        with self.timers["defense"]():
            for u in updates:
                u = self.defense.filter_update(u, self.models[u.prototype], self.prototype_context(ctx, u.prototype))
                if u is not None:
                    kept.append(u)
        return kept

    def aggregate(self, updates: list[ClientUpdate], ctx: ServerContext) -> list[Aggregation]:
        """Each prototype's aggregation as the defense decides it; the new global states are loaded."""
        out = []
        for p, model in enumerate(self.models):
            mine = [u for u in updates if u.prototype == p]
            agg = Aggregation(mine, torch.ones(len(mine)))
            if mine:
                with self.timers["defense"]():
                    agg = self.defense.aggregate(agg, model, self.prototype_context(ctx, p))
                if agg.state is not None:
                    model.load_state_dict(agg.state)
                elif agg.updates:  # every update rejected: the model stays as it was
                    model.load_state_dict(fedavg_of(agg))
            out.append(agg)
        return out

    def fuse(self, aggregations: list[Aggregation], ctx: ServerContext) -> list[torch.Tensor]:
        """FedDF: each prototype's student distils from the admitted updates of every prototype (with their
        weights) on the synthetic samples the defense keeps. Returns, per prototype, the mask of the samples
        the defense flagged (left out, or their label ignored)."""
        cfg = self.cfg
        teachers = [u for agg in aggregations for u, w in zip(agg.updates, agg.weights) if w > 0]
        weights = torch.cat([agg.weights[agg.weights > 0] for agg in aggregations]) if teachers else torch.ones(0)
        flag_masks = []
        if cfg.fl.fusion != "feddf" or cfg.fusion.steps == 0 or not teachers:
            return flag_masks
        full = self.syn["fusion"]
        for p, model in enumerate(self.models):
            plan = FusionPlan(p, list(teachers), weights.clone(), torch.ones(len(full), dtype=torch.bool))
            with self.timers["defense"]():
                plan = self.defense.on_fusion(plan, model, self.prototype_context(ctx, p))
            flagged = ~plan.keep.cpu()  # left out of fusion, or with their label ignored
            if plan.label_weight is not None:
                flagged |= plan.label_weight.cpu() == 0
            flag_masks.append(flagged)
            active = [i for i, w in enumerate(plan.teacher_weights) if w > 0]
            if not active or not plan.keep.any():
                continue
            models = [plan.teachers[i].model for i in active]
            teacher_weights = plan.teacher_weights[active]
            index = plan.keep.nonzero().flatten()
            data = full.subset(index)

            def kept(values):  # a per-sample tensor of the plan, for the kept samples, on the device
                return None if values is None else values[index.to(values.device)].to(self.device)

            with self.timers["fusion"]():
                targets = None if cfg.fusion.augment else ensemble_outputs(
                    models, teacher_weights, data.images, outputs=self.teacher_outputs(ctx.round, data.images))
                loader = training_loader(data, cfg.fusion.optim.batch_size, derive_seed(self.seed, "fusion", ctx.round, p),
                                         cfg.fusion.augment, steps=cfg.fusion.steps, targets=targets,
                                         label_weight=kept(plan.label_weight), target_mask=kept(plan.target_mask))
                module = FusionModule(model, models, teacher_weights, cfg.fusion,
                                      derive_seed(self.seed, "fusion-aug", ctx.round, p), trigger=stamp_trigger(data))
                fit(module, loader, self.setup.accelerator, callbacks=plan.callbacks, precision=cfg.precision)
        return flag_masks

    def teacher_outputs(self, r: int, images: torch.Tensor) -> Callable:
        """How fusion gets one teacher's logits on ``images``: in round 1 through the stage cache, keyed by the
        teacher's weights and the images (cells that share round 1's clients share the outputs of every client
        model a defense leaves unchanged); later rounds compute them."""
        if r != 1 or self.cache.folder is None:
            return teacher_logits
        shared = ("teacher", tensor_digest(images), training_settings(self.cfg, self.device))

        def cached(teacher: nn.Module, images: torch.Tensor, chunk: int) -> torch.Tensor:
            key = "teachers/" + self.cache.key(*shared, model_digest([teacher]), chunk)
            return self.cache.cached(key, lambda: {"logits": teacher_logits(teacher, images, chunk).cpu()})[
                "logits"].to(images.device)

        return cached

    def finish_round(self, ctx: ServerContext) -> None:
        """The defense's last word on each global model (e.g. repair), then a finiteness check."""
        for p, model in enumerate(self.models):
            with self.timers["defense"]():
                self.models[p] = self.defense.after_round(model, p, self.prototype_context(ctx, p))
            _check_finite(self.models[p], f"round {ctx.round}")

    def evaluate_model(self, model: nn.Module, r: int) -> dict[str, float]:
        """ACC / ASR / RA of one global model; the pre-trained model's (round 0) through the stage cache, keyed by
        its weights and the test sets (every cell of a grid that pre-trains alike evaluates it once)."""
        test, bd = self.setup.test, self.backdoor_set

        def compute() -> dict[str, float]:
            return evaluate(model, test, bd, self.cfg.eval.batch_size, self.device)

        if r != 0 or self.cache.folder is None:
            return compute()
        key = "evaluations/" + self.cache.key(
            "evaluate", model_digest([model]), tensor_digest(test.images, test.labels, bd.images, bd.targets, bd.labels),
            self.cfg.eval.batch_size, training_settings(self.cfg, self.device))
        return self.cache.cached(key, compute)

    def evaluate(self, r: int, **timings: float) -> dict:
        """ACC / ASR / RA of the global model(s) on the test data (never seen by a defense), with the
        round's ``timings`` (seconds)."""
        per_proto = [self.evaluate_model(m, r) for m in self.models]
        share = [self.proto_of.count(p) / self.n_clients for p in range(self.n_protos)]
        row = {"round": r, **{m: float(sum(w * pm[m] for w, pm in zip(share, per_proto))) for m in ("acc", "asr", "ra")},
               **timings}
        if self.n_protos > 1:
            row["prototypes"] = per_proto
        if not all(math.isfinite(row[m]) for m in ("acc", "asr", "ra")):
            raise DivergedError(f"round {r}: non-finite metrics {row}")
        self.rounds.append(row)
        return row

    def decisions(self, selected: list[int], aggregations: list[Aggregation], flag_masks: list[torch.Tensor],
                  ctx: ServerContext) -> dict:
        """The round's decisions and their scores against the ground truth the runner alone knows:
        client-level detection (rejected = not admitted, or weight 0) and, where the defense flagged
        synthetic samples, recall / precision against the attack's poisoned ones."""
        admitted = sorted({cid for agg in aggregations for cid in agg.teachers()})
        malicious = [c for c in selected if c in self.malicious]
        row = {"malicious_selected": malicious, "admitted": admitted,
               **client_detection(selected, malicious, admitted)}
        flagged = set(ctx.decisions.get("flagged_synthetic", []))
        for mask in flag_masks:
            flagged |= set(mask.nonzero().flatten().tolist())
        flagging = "flagged_synthetic" in ctx.decisions or any(m.any() for m in flag_masks)
        row.update(sample_detection(flagged, self.attack.poisoned_samples("fusion"), flagging))
        row["decisions"] = {k: v for k, v in ctx.decisions.items() if k != "flagged_synthetic"}
        return row

    # ------------------------------------------------------------ the run

    def run(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        pretrain(self.models, self.syn["pretrain"], cfg, self.setup, self.cache)
        pre = self.evaluate(0, seconds=time.perf_counter() - t0, defense_seconds=0.0)
        log_round(self.tracker, pre)
        self.log(f"[{cfg.key()}] pre-training done: acc {pre['acc']:.2f} asr {pre['asr']:.2f}")
        bar = _progress(cfg)
        for r in range(1, cfg.fl.rounds + 1):
            t_round, before = time.perf_counter(), {k: t.seconds for k, t in self.timers.items()}
            ctx = self.context(r)
            selected = self.select_clients(r, ctx)
            updates = self.filter_updates(self.train_clients(r, selected, ctx), ctx)
            aggregations = self.aggregate(updates, ctx)
            flags = self.fuse(aggregations, ctx)
            self.finish_round(ctx)
            if r % cfg.eval.every == 0 or r == cfg.fl.rounds:
                spent = {f"{k}_seconds": t.seconds - before[k] for k, t in self.timers.items()}
                row = self.evaluate(r, seconds=time.perf_counter() - t_round, **spent)
                row.update(self.decisions(selected, aggregations, flags, ctx))
                log_round(self.tracker, row)
                bar.set_postfix(acc=f"{row['acc']:.1f}", asr=f"{row['asr']:.1f}")
            bar.update(1)
        bar.close()
        final = self.rounds[-1]
        return {
            "key": cfg.key(),
            "config": cfg.to_dict(with_runtime=False),
            "attack": self.attack.describe(),
            "defense": self.defense.describe(),
            "metrics": {m: final[m] for m in ("acc", "asr", "ra")},
            "prototype_metrics": final.get("prototypes"),
            "rounds": self.rounds,
            "malicious_clients": self.malicious,
            "client_sizes": [len(c) for c in self.setup.clients],
            "synthetic": {k: self.manifest[k] for k in ("provider", "size", "content_sha256")},
            "dataset_source": self.setup.dataset.source,
            "train_seconds": time.perf_counter() - t0,
            "defense_seconds": self.timers["defense"].seconds,
            "device": str(self.device),
            "versions": versions(),
        }


def run_cell(cfg: CellConfig, out_dir: str | os.PathLike | None = None, log=print, plugins: Plugins | None = None) -> dict:
    """Run one experiment cell with ``plugins`` (built from the config's names when None); writes
    ``record.json`` and ``models/`` under ``out_dir`` if given."""
    started = time.time()
    L.seed_everything(cfg.seed, verbose=False)
    setup = prepare(cfg)
    tracker = round_logger(cfg.runtime.logger, out_dir, cfg.key(), flatten(cfg.to_dict()))
    run = FederatedRun(cfg, setup, plugins or build_plugins(cfg), log, tracker)
    record = run.run()
    if tracker is not None:
        tracker.finalize("success")
    record["wall_seconds"] = time.time() - started
    if out_dir is not None:
        save_cell(record, run.models, Path(out_dir), run.defense.state_dict())
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
