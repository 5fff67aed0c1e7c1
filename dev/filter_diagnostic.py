"""How well do the abnormal-activation filter of ``actbound`` and the blur and occlusion signals of
``actaudit``'s audit find the poisoned synthetic samples?

``python -m dev.filter_diagnostic [--config cell.yaml] [--set k=v ...]`` pre-trains the global
model on the attacked synthetic set exactly as the FL loop does, runs the filter and the blur signal
(neither sees which samples are poisoned) and scores them against the attack's ground truth, which only
this diagnostic knows: recall and false-positive rate per threshold or blur sigma, and per-site score
medians. The blur signal flags as ``actaudit`` does (robust z of the label-margin drop under the blur
above ``audit_z``, and at least ``margin_cut`` of the margin lost; its defaults). The occlusion signal
needs flags to start from: it is given a random share of the poisoned samples (``--given``; what a
partial first audit finds) or 100 random clean ones (what an attack-free audit may flag), and scored on
what it adds, at ``actaudit``'s default ``occlusion_share``.
"""
from __future__ import annotations

import argparse
import sys

import lightning as L
import torch

from benchmarks.cli import add_cell_arguments, cell_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dev.filter_diagnostic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_arguments(parser)
    parser.add_argument("--z", type=float, action="append", help="thresholds (default 2.5, 3.5, 5)")
    parser.add_argument("--sigma", type=float, action="append", help="blur sigmas (default 0.5, 0.7, 1.0)")
    parser.add_argument("--given", type=float, action="append",
                        help="shares of the poison given to the occlusion signal as flags (default 0.15, 0.5)")
    args = parser.parse_args(argv)
    if any(not 0 < g <= 1 for g in args.given or []):
        parser.error(f"--given: each share must be in (0, 1], got {args.given}")
    args.overrides = ["attack.name=fm", *args.overrides]
    cfg = cell_config(args)
    from defenses import DEFENSES

    try:  # the audits the blur rows use, built (and so validated) before any compute
        audits = {sigma: DEFENSES.get("actaudit")(blur_sigma=sigma) for sigma in args.sigma or [0.5, 0.7, 1.0]}
    except ValueError as err:
        parser.error(f"--sigma: {err}")

    from attacks import ATTACKS, make_trigger
    from attacks.poisoning import poison_indices
    from defenses.actaudit import blur_margin_drop
    from defenses.actbound import abnormal_samples, class_margins, robust_z
    from fl_core.activations import channel_peaks, site_outputs
    from fl_core.fl import StageCache, initial_models, prepare, pretrain
    from fl_core.metrics import logits
    from fl_core.synthetic import synthetic_set

    L.seed_everything(cfg.seed, verbose=False)
    setup = prepare(cfg)
    request = setup.synthetic_request()
    synthetic, _ = synthetic_set(request)
    attack = ATTACKS.get(cfg.attack.name)(**cfg.attack.params)
    attack.bind(cfg.backdoor, make_trigger(cfg.backdoor.trigger), fm=request)
    poisoned = attack.poison_synthetic(synthetic, "pretrain", cfg.seed)
    truth = torch.zeros(len(synthetic), dtype=torch.bool)
    truth[poison_indices(synthetic.labels, cfg.backdoor, attack.poison_rate, cfg.seed, "fm")] = True
    model = initial_models(cfg, setup)[0]
    pretrain([model], poisoned.to(setup.device), cfg, setup, StageCache.for_cell(cfg, setup.cache_dir))
    sites = list(model.activation_sites())
    print(f"{int(truth.sum())} of {len(truth)} synthetic samples poisoned; model pre-trained on them")
    print("| unit, threshold z | flagged | recall | false-positive rate |\n|---|---|---|---|")
    for unit in ("channel", "element"):
        for z in args.z or [2.5, 3.5, 5.0]:
            flagged = abnormal_samples(model, poisoned.images, sites, z, unit)
            print(f"| {unit} {z} | {int(flagged.sum())} | {flagged[truth].float().mean():.3f} | "
                  f"{flagged[~truth].float().mean():.3f} |")
    peaks = site_outputs(model, poisoned.images, sites, channel_peaks)
    print("\n| site | median score, clean | median score, poisoned |\n|---|---|---|")
    for site in sites:
        score = robust_z(peaks[site]).amax(1)
        print(f"| {site} | {score[~truth].median():.2f} | {score[truth].median():.2f} |")
    labels, device = poisoned.labels.cpu(), setup.device
    margin = class_margins(logits(model, poisoned.images, 500, device), labels)
    print("\n| blur sigma | flagged | recall | false-positive rate |\n|---|---|---|---|")
    for sigma, audit in audits.items():
        drop = blur_margin_drop(model, poisoned.images, labels, margin, sigma, device)
        flagged = audit.cut(robust_z(drop), drop, margin)
        print(f"| {sigma} | {int(flagged.sum())} | {flagged[truth].float().mean():.3f} | "
              f"{flagged[~truth].float().mean():.3f} |")
    occlusion = DEFENSES.get("actaudit")()
    draw = torch.rand(len(truth), generator=torch.Generator().manual_seed(cfg.seed))
    clean = (~truth).nonzero().flatten()
    clean_given = torch.zeros_like(truth)
    clean_given[clean[torch.randperm(len(clean), generator=torch.Generator().manual_seed(cfg.seed))[:100]]] = True
    print(f"\n| occlusion (share {occlusion.occlusion_share}), flags given | occluded pixels | flagged | "
          "recall | false-positive rate (the given flags included) |\n|---|---|---|---|---|")
    for name, given in [*((f"{g:.0%} of the poison", truth & (draw < g)) for g in args.given or [0.15, 0.5]),
                        ("100 clean samples", clean_given)]:
        flagged, pixels = occlusion.occlusion_audit(model, poisoned.images, labels, margin, given, device)
        flagged |= given
        print(f"| {name} | {pixels} | {int(flagged.sum())} | {flagged[truth].float().mean():.3f} | "
              f"{flagged[~truth].float().mean():.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
