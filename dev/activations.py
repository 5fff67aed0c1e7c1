"""Evidence plot: per-layer activation distributions on clean vs triggered test inputs, before and after
the learned activation bounds, and the cell model's ACC / ASR / RA without and with its bounds (printed:
whether the backdoor lives in the weights or only gets past the clamps).
``python -m dev.activations CELL_DIR [--out plot.png]``.

CELL_DIR is a cell output folder of a run with ``defense.name: actbound`` (it holds record.json,
models/prototype0.pt and models/defense.pt). Test inputs are used for this picture only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from attacks import make_trigger
from defenses.actbound import BoundState, attach_clamps
from fl_core.activations import channel_peaks, site_outputs
from fl_core.data import load_dataset
from fl_core.fl import scored_test_set
from fl_core.metrics import backdoor_test_set, evaluate
from fl_core.models import build_model
from fl_core.schema import CellConfig, from_dict


def load_cell(cell: Path, data_root: str | None):
    """(config, model with the saved weights, saved bounds, dataset) of a cell folder."""
    record = json.loads((cell / "record.json").read_text())
    cfg = from_dict(CellConfig, record["config"])
    ds = load_dataset(cfg.data.dataset, data_root)
    model = build_model(cfg.model.specs()[0], ds.image_shape[0], ds.num_classes, ds.mean, ds.std)
    model.load_state_dict(torch.load(cell / "models" / "prototype0.pt", weights_only=True))
    bounds_file = cell / "models" / "defense.pt"
    bounds = torch.load(bounds_file, weights_only=True) if bounds_file.is_file() else {}
    return cfg, model.eval(), bounds, ds


def bounded(model, bounds: dict, prototype: int = 0) -> BoundState:
    """Attach the saved upper (and lower) bounds of ``prototype`` as clamps; returns their state."""
    uppers = {k.split("/")[1]: v for k, v in bounds.items() if k.startswith(f"{prototype}/") and k.endswith("/upper")}
    lowers = {k.split("/")[1]: v for k, v in bounds.items() if k.startswith(f"{prototype}/") and k.endswith("/lower")}
    sites = model.activation_sites()
    state = BoundState({s: sites[s] for s in uppers}, uppers, {s: torch.zeros_like(u) for s, u in uppers.items()},
                       lowers, enabled=True)
    attach_clamps(state)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dev.activations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cell", help="cell output folder")
    parser.add_argument("--out", help="PNG to write (default: CELL/activations.png)")
    parser.add_argument("--data-root")
    parser.add_argument("--samples", type=int, default=1000, help="test images per kind (default 1000)")
    args = parser.parse_args(argv)
    cell = Path(args.cell)
    cfg, model, bounds, ds = load_cell(cell, args.data_root)
    if not bounds:
        parser.exit(2, f"{cell} holds no models/defense.pt: run the cell with defense.name=actbound\n")
    test = scored_test_set(ds.test, cfg)  # the images the run scored
    trig = backdoor_test_set(test, cfg.backdoor, make_trigger(cfg.backdoor.trigger), cfg.seed)
    n = min(args.samples, len(trig.labels))
    clean = test.images[(test.labels != cfg.backdoor.target)][:n]
    triggered = trig.images[:n]
    sites = list(model.activation_sites())

    def outputs():
        return {kind: site_outputs(model, images, sites, channel_peaks) for kind, images in
                (("clean", clean), ("triggered", triggered))}

    def metrics():
        values = evaluate(model, test, trig, cfg.eval.batch_size, torch.device("cpu"))
        return " / ".join(f"{values[k]:.2f}" for k in ("acc", "asr", "ra"))

    before, free = outputs(), metrics()
    state = bounded(model, bounds)
    after = outputs()
    print(f"ACC / ASR / RA (%) of {cell.name}: without the bounds {free}; with them {metrics()}")
    for h in state.handles:
        h.remove()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sites), 2, figsize=(10, 2.4 * len(sites)), squeeze=False)
    for row, site in enumerate(sites):
        for col, (title, acts) in enumerate((("unbounded", before), ("with learned bounds", after))):
            ax = axes[row, col]
            top = max(float(acts["clean"][site].max()), float(acts["triggered"][site].max()), 1e-6)
            for kind, colour in (("clean", "tab:blue"), ("triggered", "tab:red")):
                # per sample, the largest channel peak of this layer: where backdoor neurons show up
                ax.hist(acts[kind][site].amax(1).numpy(), bins=40, range=(0, top), alpha=0.55, color=colour,
                        label=kind, density=True)
            ax.set_title(f"{site}: {title}", fontsize=8)
            ax.tick_params(labelsize=7)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"max channel activation per sample, clean vs triggered test inputs (cell {cell.name})",
                 fontsize=9)
    fig.tight_layout()
    out = Path(args.out or cell / "activations.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
