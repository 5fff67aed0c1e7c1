"""The suite's own generative FM (issue 18): train it, make everything a grid's cells sample, and show what it draws.

  python -m benchmarks.fm train-ddpm --config cell.yaml [--set k=v ...] [--retrain]
  python -m benchmarks.fm prepare --preset generated [--only data.dataset=cifar10]
  python -m benchmarks.fm samples --preset generated --out results/generated-cpu [--only ...]
  python -m benchmarks.fm quality --preset generated --out results/generated-cpu [--only ...]

``prepare`` trains each distinct FM the grid's ``ddpm`` cells name, once (on the public pool of its
``train_seed``; skipped when trained), with all usable CPUs unless ``--threads`` says otherwise (the
thread count and device are in the FM's manifest); then the compromised copies of ``fm-generator`` cells;
then draws every synthetic set the cells use, and the poisoned samples the compromised copies draw for
them (each with the cells' own ``runtime.threads``, as a cell would, several side by side), so that no
grid worker draws anything. ``samples`` writes, per dataset and
synthetic provider, a PNG of the first samples of every class of the seed-0 synthetic set, and for
``fm-generator`` cells what the compromised FM drew: the poisoned samples (before relabelling, by true
class) and the rest. ``quality`` writes ``quality.csv``: the classification accuracy score of every
synthetic set of the attack-free cells, on real test images as they are and at the FM's resolution.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from benchmarks.cli import runtime_overrides
from benchmarks.gridspec import expand, load_grid, resolve_grid_path
from fl_core.config import load_config, validate
from fl_core.data import ImageData
from fl_core.schema import CellConfig, ConfigError, from_dict
from fl_core.threads import parallel_cells, usable_cpus


def grid_configs(preset: str | None, config: str | None, only: list[str], overrides: list[str]) -> list[CellConfig]:
    """The validated configs of the grid's selected cells (cpu scale)."""
    return [c.config for c in expand(load_grid(resolve_grid_path(preset, config)), "cpu", tuple(overrides), tuple(only))]


def distinct(configs: list[CellConfig], *parts) -> list[CellConfig]:
    """One config per distinct value of ``parts`` (functions of a config), in grid order."""
    seen, out = set(), []
    for cfg in configs:
        key = repr([part(cfg) for part in parts])
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out


def train_all(configs: list[CellConfig], threads: int) -> list[Path]:
    """Train every distinct FM of ``configs`` that is not trained yet, then the compromised copies their
    ``fm-generator`` cells fine-tune (so that no cell trains one); their folders."""
    from fl_core.synthetic import ddpm_training_settings

    ddpm = [dataclasses.replace(c, runtime=dataclasses.replace(c.runtime, threads=threads))
            for c in configs if c.synthetic.provider == "ddpm"]
    fm_key = (lambda c: c.data.dataset, lambda c: c.data.public_size, lambda c: ddpm_training_settings(c.synthetic.ddpm))
    folders = [train_fm(cfg) for cfg in distinct(ddpm, *fm_key)]
    for cfg in distinct([c for c in ddpm if c.attack.name == "fm-generator"], *fm_key,
                        lambda c: c.attack.params, lambda c: dataclasses.asdict(c.backdoor.trigger)):
        folders.append(generator_attack(cfg, fm_training_request(cfg)).compromised_fm(train=True))
    return folders


def fm_training_request(cfg: CellConfig):
    """The request an FM is trained (and fine-tuned) with: the public pool of its ``train_seed``, which
    serves every cell seed."""
    from fl_core.fl import prepare

    return prepare(dataclasses.replace(cfg, seed=cfg.synthetic.ddpm.train_seed)).synthetic_request()


def train_fm(cfg: CellConfig, accelerator: str | None = None, retrain: bool = False) -> Path:
    """Train the DDPM a cell config names unless it is already trained; returns its folder."""
    from fl_core.synthetic import ddpm_folder, train_ddpm

    req = fm_training_request(cfg)
    folder = ddpm_folder(req)
    if (folder / "unet").is_dir() and not retrain:
        print(f"DDPM already trained: {folder}")
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # --retrain: the old weights go first
    return train_ddpm(req, accelerator=accelerator or ("gpu" if req.device.type == "cuda" else "cpu"))


def draw_set(cell: dict) -> int:
    """Draw (or load) the synthetic set of one cell config, given as a plain dict, and for an ``fm-generator``
    cell the poisoned samples its compromised FM draws; the set's size."""
    from fl_core.fl import prepare
    from fl_core.synthetic import synthetic_set

    cfg = validate(from_dict(CellConfig, cell))
    req = prepare(cfg).synthetic_request()
    synthetic = synthetic_set(req)[0]
    if cfg.attack.name == "fm-generator":
        generator_attack(cfg, req).poison(synthetic, cfg.seed)  # both stages use the same draws
    return len(synthetic)


def draw_all(configs: list[CellConfig], jobs: int) -> int:
    """Draw every distinct synthetic set of the ``ddpm`` cells (and every distinct set of samples their
    compromised FMs draw), ``jobs`` side by side; how many."""
    def generator_draws(c: CellConfig):
        if c.attack.name != "fm-generator":
            return None
        return c.attack.params, dataclasses.asdict(c.backdoor)

    sets = distinct([c for c in configs if c.synthetic.provider == "ddpm"], lambda c: c.data.dataset,
                    lambda c: c.data.public_size, lambda c: dataclasses.asdict(c.synthetic), lambda c: c.seed,
                    generator_draws)
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        return len(list(pool.map(draw_set, [c.to_dict() for c in sets])))


def generator_attack(cfg: CellConfig, req):
    """The cell's ``fm-generator`` attack, bound to its trigger and to the FM of ``req``."""
    from attacks import ATTACKS, make_trigger

    attack = ATTACKS.get("fm-generator")(**cfg.attack.params)
    attack.bind(cfg.backdoor, make_trigger(cfg.backdoor.trigger), fm=req)
    return attack


def sample_sheet(data: ImageData, per_class: int, title: str, path: Path) -> Path:
    """A PNG: one row per class (labelled), the first ``per_class`` images of each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    rows, names = [], []
    for k, name in enumerate(data.classes):
        chosen = data.images[data.labels == k][:per_class]
        if len(chosen):
            pad = torch.zeros((per_class - len(chosen), *chosen.shape[1:]), dtype=chosen.dtype)
            rows.append(torch.cat([chosen, pad]))
            names.append(name)
    images = torch.cat(rows)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    sheet = make_grid(images, nrow=per_class, padding=1).permute(1, 2, 0).numpy()
    fig, ax = plt.subplots(figsize=(per_class * 0.45 + 1.5, len(rows) * 0.45 + 0.6))
    ax.imshow(sheet, interpolation="nearest")
    step = sheet.shape[0] / len(rows)
    ax.set_yticks([step * (i + 0.5) for i in range(len(rows))], names, fontsize=7)
    ax.set_xticks([])
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def write_samples(configs: list[CellConfig], out: Path, per_class: int) -> list[Path]:
    """Sample sheets of the seed-0 synthetic sets (and fm-generator draws) of ``configs``."""
    from fl_core.fl import prepare
    from fl_core.synthetic import synthetic_set

    written = []
    for cfg in distinct(configs, lambda c: c.data.dataset, lambda c: dataclasses.asdict(c.synthetic),
                        lambda c: c.attack.name == "fm-generator" and c.attack.params):
        cfg = dataclasses.replace(cfg, seed=0)
        req = prepare(cfg).synthetic_request()
        data, _ = synthetic_set(req)
        name = f"{cfg.data.dataset}-{cfg.synthetic.provider}"
        if out / f"samples-{name}.png" not in written:  # one sheet per set, however many attacks share it
            written.append(sample_sheet(data, per_class, f"{name}: synthetic set, seed 0", out / f"samples-{name}.png"))
        if cfg.attack.name == "fm-generator":
            poisoned, idx = generator_attack(cfg, req).poison(data, cfg.seed)
            triggered = torch.zeros(len(data), dtype=torch.bool)
            triggered[idx.cpu()] = True
            for mask, what, suffix in ((triggered, "trigger condition, true class", ""), (~triggered, "class condition", "-clean")):
                drawn = ImageData(poisoned.images[mask], data.labels[mask], data.classes)
                written.append(sample_sheet(drawn, per_class, f"{name}: drawn by the compromised FM ({what})",
                                            out / f"samples-{name}-fm-generator{suffix}.png"))
    return written


def quality(configs: list[CellConfig]) -> list[dict]:
    """The classification accuracy score of every distinct synthetic set of the grid's attack-free cells:
    the cell's model pre-trained on the set alone (its own pre-training, shared through the stage cache),
    ACC on the real test split as it is and brought down to the FM's resolution and back up (the share of
    the gap that resolution alone explains). Test data only measures the FM; nothing is chosen on it."""
    from fl_core.fl import initial_models, prepare, pretrain
    from fl_core.metrics import accuracy, predict
    from fl_core.stages import StageCache
    from fl_core.synthetic import at_resolution, synthetic_set

    rows = []
    for cfg in distinct([c for c in configs if c.attack.name == "none"], lambda c: c.data.dataset,
                        lambda c: dataclasses.asdict(c.synthetic), lambda c: c.seed):
        setup = prepare(cfg)
        data, _ = synthetic_set(setup.synthetic_request())
        models = initial_models(cfg, setup)
        pretrain(models, data, cfg, setup, StageCache.for_cell(cfg, setup.cache_dir))
        model = models[0]
        test, size = setup.test, setup.dataset.image_shape[-1]
        fm_size = cfg.synthetic.ddpm.image_size or size
        low = at_resolution(at_resolution(test.images, fm_size), size)
        k = setup.dataset.num_classes
        acc = {f"acc_{name}": accuracy(predict(model, images, cfg.eval.batch_size, setup.device), test.labels, k)
               for name, images in (("real", test.images), ("at_fm_resolution", low))}
        rows.append({"dataset": cfg.data.dataset, "synthetic": cfg.synthetic.provider, "seed": cfg.seed,
                     "fm_resolution": fm_size, **acc})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train-ddpm", "prepare", "samples", "quality"])
    parser.add_argument("--preset", help="grid preset whose ddpm cells to serve (default: generated)")
    parser.add_argument("--config", help="train-ddpm: a cell YAML; the others: a grid YAML instead of a preset")
    parser.add_argument("--only", action="append", default=[], metavar="AXIS=VALUE", help="as in benchmarks.grid")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data-root", help="data root (default: $FMFL_DATA_ROOT or ./data)")
    parser.add_argument("--device", help="auto | cpu | cuda[:N] (training and drawing)")
    parser.set_defaults(no_stage_cache=False)  # no stage runs here
    parser.add_argument("--threads", type=int, default=usable_cpus(),
                        help="prepare: torch threads for training an FM (default: all usable)")
    parser.add_argument("--out", default="results/generated-cpu", help="samples, quality: output folder")
    parser.add_argument("--per-class", type=int, default=10, help="samples: images per class")
    parser.add_argument("--retrain", action="store_true", help="train-ddpm: delete the trained weights and train again")
    args = parser.parse_args(argv)
    if args.command == "train-ddpm":
        try:
            cfg = load_config(args.config, args.overrides + runtime_overrides(args))
        except ConfigError as err:
            parser.exit(2, f"config error: {err}\n")
        print(f"DDPM saved to {train_fm(cfg, retrain=args.retrain)}")
        return 0
    try:
        if args.threads < 1 or args.per_class < 1:
            raise ConfigError("--threads and --per-class must be >= 1")
        configs = grid_configs(args.preset or "generated", args.config, args.only,
                               args.overrides + runtime_overrides(args))
        if args.command == "prepare" and not any(c.synthetic.provider == "ddpm" for c in configs):
            raise ConfigError("the selected cells sample no DDPM (synthetic.provider: ddpm)")
    except (ConfigError, KeyError) as err:
        parser.exit(2, f"config error: {err}\n")
    if args.command == "prepare":
        for folder in train_all(configs, args.threads):
            print(f"FM ready: {folder}")
        threads = max(c.runtime.threads for c in configs)
        print(f"synthetic sets ready: {draw_all(configs, parallel_cells(len(configs), threads))}")
    elif args.command == "samples":
        for path in write_samples(configs, Path(args.out), args.per_class):
            print(f"wrote {path}")
    else:
        import pandas as pd

        table = pd.DataFrame(quality(configs))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        table.to_csv(Path(args.out) / "quality.csv", index=False)
        print(table.to_markdown(index=False, floatfmt=".2f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
