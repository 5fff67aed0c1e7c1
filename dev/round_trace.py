"""Where does a defended cell's ASR come from, round by round?

``python -m dev.round_trace --draw dev019-blend-fm --dataset cifar10 --defense 'vouch(distil=True,scope=outliers)'``
runs one development cell and prints, per round, the ACC / ASR / target-class accuracy of every client model
after local training, of the aggregate (before fusion), of the fused model and of the model the round ends
with (after the defense's ``after_round``), so that a rise of ASR or a fall of the target class can be placed
in local training, aggregation, fusion or the defense's own retraining. Development draws only: the script
refuses a test draw.
"""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dev.round_trace", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draw", required=True, help="a development draw label, e.g. dev019-blend-fm")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--defense", default="vouch(scope=outliers)", help="a defense label of the zoo_dev preset")
    parser.add_argument("--clean", action="store_true",
                        help="the draw's clean twin: its trigger and target, no attack, no defense (its natural ASR)")
    args = parser.parse_args(argv)
    from dev.zoo_cell import development_cell

    if args.clean:  # the zoo's clean draw of the same index, which runs undefended only
        cfg = development_cell(parser, args.draw.rsplit("-", 1)[0] + "-clean", args.dataset, "none")
    else:
        cfg = development_cell(parser, args.draw, args.dataset, args.defense)
    from fl_core import fl
    from fl_core.metrics import evaluate, logits

    print(f"attack {cfg.attack.name} {cfg.attack.params}, backdoor {cfg.backdoor}, defense {cfg.defense.name} {cfg.defense.params}")
    target = cfg.backdoor.target

    def score(run, model) -> str:
        m = evaluate(model, run.setup.test, run.backdoor_set, run.cfg.eval.batch_size, run.device)
        test = run.setup.test
        of_target = test.labels == target
        hits = logits(model, test.images[of_target], 500, run.device).argmax(1).cpu() == target
        return f"acc {m['acc']:5.1f} asr {m['asr']:5.1f} target-class acc {100 * hits.float().mean():5.1f}"

    stages = {name: getattr(fl.FederatedRun, name) for name in ("aggregate", "fuse", "finish_round")}

    def aggregate(self, updates, ctx):
        for u in updates:
            print(f"round {ctx.round} client {u.client_id:2d}: {score(self, u.model)}", flush=True)
        out = stages["aggregate"](self, updates, ctx)
        print(f"round {ctx.round} aggregate: {score(self, self.models[0])}", flush=True)
        return out

    def fuse(self, aggregations, ctx):
        out = stages["fuse"](self, aggregations, ctx)
        print(f"round {ctx.round} fused: {score(self, self.models[0])}", flush=True)
        return out

    def finish_round(self, ctx):
        stages["finish_round"](self, ctx)
        print(f"round {ctx.round} end: {score(self, self.models[0])}", flush=True)

    fl.FederatedRun.aggregate, fl.FederatedRun.fuse, fl.FederatedRun.finish_round = aggregate, fuse, finish_round
    fl.run_cell(cfg, out_dir=None, log=print)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
