"""The predecessors' enhanced classic attack for distillation-based fusion ([P1], [P2])."""
from attacks import ATTACKS
from attacks.badnets import BadNets
from attacks.poisoning import check_rate, check_stages, poison_data


@ATTACKS.register("enhanced")
class EnhancedClassic(BadNets):
    """BadNets by malicious clients, plus triggered copies of ``synthetic_rate`` of every eligible
    class added to the synthetic set with their *correct* labels, so that the malicious teachers'
    backdoor can travel through distillation. ``stages`` picks where the augmented set is used."""

    def __init__(self, synthetic_rate: float = 0.2, stages: str = "both", **kwargs):
        super().__init__(**kwargs)
        check_rate("synthetic_rate", synthetic_rate)
        check_stages(stages)
        self.synthetic_rate, self.stages = synthetic_rate, stages

    def poison_synthetic(self, synthetic, stage, seed):
        if self.stages not in ("both", stage):
            return synthetic
        triggered, idx = poison_data(synthetic, self.trigger, self.backdoor, self.synthetic_rate, seed, "enhanced",
                                     relabel=False)
        return synthetic.concat(triggered.subset(idx))
