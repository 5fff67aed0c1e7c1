"""Client vouching with its development choices frozen (``docs/VOUCH.md``): issue 39's defense against the
FM threat (clean clients vouch for the FM's labels) and the classic one (FLTrust's rule against the server's
own update). ``vouch`` holds every variant development compared; this class exposes only the choices a
user may want to change, and computes what ``vouch`` computes with them."""
from __future__ import annotations

from defenses import DEFENSES, Defense
from defenses.vouch import SUSPECT_SCOPES, ClientVouching

AGGREGATIONS = ("trust", "clip", "mean")  # FLTrust's rule, the median-norm clip, or plain FedAvg / FedDF weights
SUSPECT_LABELS = ("fusion", "exclude", "keep")  # where a suspect class's vouched labels are used


@DEFENSES.register("clientvouch")
class FrozenClientVouching(Defense):
    """Parameters (``docs/VOUCH.md`` says what each was chosen on):

    - ``vouch_round`` (1): the round whose clients' ensemble vouches for the FM's labels.
    - ``top_k`` (1): a label is vouched for when it is among the ensemble's ``top_k`` classes.
    - ``scope`` ("outliers"): which labels need a vouch (``all``, or the suspect classes that
      ``outliers``, ``surplus``, ``pairs`` or ``asymmetric`` find).
    - ``aggregation`` ("trust"): FLTrust's rule with the vouched samples as root data, the median-norm
      clip, or the loop's own weights (``mean``).
    - ``suspect_labels`` ("fusion"): a suspect class's vouched labels teach in fusion and FLTrust's root
      data but never in the retraining (``fusion``), nowhere (``exclude``), or wherever vouched labels
      teach (``keep``).
    """

    consumes = ClientVouching.consumes

    def __init__(self, vouch_round: int = 1, top_k: int = 1, scope: str = "outliers", aggregation: str = "trust",
                 suspect_labels: str = "fusion"):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation {aggregation!r} unknown; valid: {', '.join(AGGREGATIONS)}")
        if suspect_labels not in SUSPECT_LABELS:
            raise ValueError(f"suspect_labels {suspect_labels!r} unknown; valid: {', '.join(SUSPECT_LABELS)}")
        if suspect_labels != "keep" and scope == "all":
            raise ValueError(f"suspect_labels {suspect_labels!r} acts on suspect classes, which scope 'all' has none "
                             f"of: choose scope {' / '.join(SUSPECT_SCOPES)} or suspect_labels 'keep'")
        self.vouch_round, self.top_k, self.scope = vouch_round, top_k, scope
        self.aggregation, self.suspect_labels = aggregation, suspect_labels
        self._vouch = ClientVouching(vouch_round=vouch_round, top_k=top_k, scope=scope, clip=aggregation == "clip",
                                     trust=aggregation == "trust", exclude=suspect_labels != "keep",
                                     fusion_labels=suspect_labels == "fusion")

    def check(self, cfg) -> None:
        self._vouch.check(cfg)

    def before_round(self, global_model, prototype, ctx):
        self._vouch.before_round(global_model, prototype, ctx)

    def changes_broadcast(self, round_idx: int) -> bool:
        return self._vouch.changes_broadcast(round_idx)

    def aggregate(self, agg, global_model, ctx):
        return self._vouch.aggregate(agg, global_model, ctx)

    def on_fusion(self, plan, global_model, ctx):
        return self._vouch.on_fusion(plan, global_model, ctx)

    def after_round(self, global_model, prototype, ctx):
        return self._vouch.after_round(global_model, prototype, ctx)
