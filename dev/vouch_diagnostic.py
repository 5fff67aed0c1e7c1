"""How well does a clean-start client ensemble vouch for the FM's labels on a zoo development draw?

``python -m dev.vouch_diagnostic --draw dev000-patch-fm [--dataset cifar10] [--round 2]`` runs the draw's
cell with the ``vouch`` defense up to its vouching round (or ``--round``), keeps that round's clients'
probabilities on the synthetic set, and scores vouching rules against the attack's ground truth (which
only this diagnostic knows): per rule, the share of clean samples vouched for (of the target class's
too) and the share of poisoned samples leaked, then per FM label the counts that ``scope: outliers``
reads (rejected labels and their robust z-score). Development draws only: the script refuses a test draw.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dev.vouch_diagnostic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draw", required=True, help="a development draw label, e.g. dev000-patch-fm")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--param", action="append", default=[], help="vouch parameter k=v (YAML value)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="cell overrides (defense.* too)")
    parser.add_argument("--round", type=int, help="the round whose clients judge (default: the vouching round; "
                                                  "a later one shows what a renewal's judge sees)")
    parser.add_argument("--save", help="also save the judge's view (labels, ensemble probabilities, poisoned mask, "
                                       "target) to this file, for offline analysis of the vouching rules")
    args = parser.parse_args(argv)
    if args.round is not None and args.round < 1:
        parser.error(f"--round must be >= 1, got {args.round}")
    from dev.zoo_cell import development_cell

    cfg = development_cell(parser, args.draw, args.dataset, "vouch", tuple(args.overrides))
    import defenses.vouch as vouch
    from fl_core.fl import run_cell
    from fl_core.metrics import logits

    import yaml

    cfg.defense.params.update({k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.param)})
    captured = {}
    original = vouch.ClientVouching.aggregate
    judging_round = args.round or cfg.defense.params.get("vouch_round", 1)

    def capture(self, agg, global_model, ctx):  # every prototype's clients, clipped: the judge is all of them
        agg = original(self, agg, global_model, ctx)
        if ctx.round == judging_round:
            probs = [F.softmax(logits(u.model, ctx.synthetic.images, 500, ctx.device).float(), 1).cpu()
                     for u in agg.updates]
            captured.setdefault("probs", []).extend(probs)
            captured["labels"] = ctx.synthetic.labels.cpu()
        return agg

    vouch.ClientVouching.aggregate = capture
    cfg.fl.rounds = judging_round
    from attacks import ATTACKS, make_trigger
    from fl_core.data import bind_trigger_pool
    from fl_core.fl import prepare
    from fl_core.synthetic import synthetic_set

    run_cell(cfg, out_dir=None, log=lambda *_: None)
    setup = prepare(cfg)
    attack = ATTACKS.get(cfg.attack.name)(**cfg.attack.params)
    trigger = make_trigger(cfg.backdoor.trigger)
    bind_trigger_pool(trigger, setup.public.images)
    attack.bind(cfg.backdoor, trigger, fm=setup.synthetic_request())
    attack.poison_synthetic(synthetic_set(setup.synthetic_request())[0], "fusion", cfg.seed)
    poisoned = torch.zeros(len(captured["labels"]), dtype=torch.bool)
    poisoned[attack.poisoned_samples("fusion")] = True
    probs, labels = torch.stack(captured["probs"]), captured["labels"]
    mean = probs.mean(0)
    p_label = mean.gather(1, labels[:, None]).squeeze(1)
    rank = (mean > p_label[:, None]).sum(1)  # 0: the label is the ensemble's top class
    votes = (probs.argmax(2) == labels).float().mean(0)  # share of clients whose top class is the label
    ratio = p_label / mean.max(1).values
    print(f"{args.draw} {args.dataset}: {int(poisoned.sum())} poisoned of {len(labels)}; ensemble top-1 acc on clean "
          f"{100 * float((rank[~poisoned] == 0).float().mean()):.1f} %")
    rules = {f"top-{k}": rank < k for k in (1, 2, 3)}
    rules.update({f"ratio>={r}": ratio >= r for r in (0.25, 0.5, 0.75)})
    rules.update({f"votes>={v}": votes >= v for v in (0.2, 0.3, 0.5, 0.7, 0.9, 1.0)})
    clean_target = ~poisoned & (labels == cfg.backdoor.target)
    for name, vouched in rules.items():
        print(f"  {name:12s} clean vouched {100 * float(vouched[~poisoned].float().mean()):5.1f} % "
              f"(target class {100 * float(vouched[clean_target].float().mean()):5.1f} %, "
              f"{int(vouched[clean_target].sum())})   "
              f"poison leaked {100 * float(vouched[poisoned].float().mean()):5.1f} % ({int(vouched[poisoned].sum())})")
    per_class(labels, rank, poisoned, mean.argmax(1), cfg.backdoor.target)
    if args.save:
        torch.save({"labels": labels, "probs": probs, "poisoned": poisoned, "target": cfg.backdoor.target,
                    "mapping": cfg.backdoor.mapping, "source": cfg.backdoor.source}, args.save)
    return 0


def per_class(labels, rank, poisoned, predicted, target) -> None:
    """Per FM label: its count, the judge's predicted count, the labels the judge rejects (top 1) and
    their robust z-score over the classes (0.6745 (x - median) / MAD), beside the poisoned count."""
    classes = int(labels.max()) + 1
    count = torch.bincount(labels, minlength=classes).float()
    judged = torch.bincount(predicted, minlength=classes).float()
    rejected = torch.bincount(labels[rank > 0], minlength=classes).float()

    def z(x):
        med = x.median()
        return 0.6745 * (x - med) / (x - med).abs().median().clamp_min(1e-9)

    print(f"  per class (target {target}): label count, judged count, rejected, z(rejected), z(count - judged), poisoned")
    for c in range(classes):
        print(f"    {c}: {int(count[c]):4d} {int(judged[c]):4d} {int(rejected[c]):4d} {float(z(rejected)[c]):6.2f} "
              f"{float(z(count - judged)[c]):6.2f} {int(poisoned[labels == c].sum()):4d}")


if __name__ == "__main__":
    raise SystemExit(main())
