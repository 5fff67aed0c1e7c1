"""The novel threat: a compromised foundation model poisons the synthetic data (BD-FMFL, [P0], [P1])."""
import dataclasses

from attacks import ATTACKS
from attacks.poisoning import check_rate, check_stages, poison_data
from fl_core.hooks import Attack


@ATTACKS.register("fm")
class CompromisedFM(Attack):
    """The FM's synthetic set carries the trigger on ``poison_rate`` of every non-target class (or of the
    source class, one-to-one), relabelled to the target. No client is malicious; the attacker takes no
    part in training. ``stages``: where the poisoned set is used: ``both`` (default, as [P1]),
    ``pretrain`` only or ``fusion`` only (the [P1] ablation). ``cover_rate`` > 0 (an adaptive attack,
    Adaptive-Blend style): that share of the other eligible samples carries the trigger at its true label,
    so that triggered activations are common in the set and a triggered sample is not abnormal per se.
    ``clean_label`` (an adaptive attack, label-consistent poisoning): the trigger goes on ``poison_rate``
    of the target class's samples instead, which keep their (true) target label; no label is wrong."""

    omit_at_default = {"cover_rate": 0.0, "clean_label": False}  # added after results were published

    def __init__(self, poison_rate: float = 0.2, stages: str = "both", cover_rate: float = 0.0,
                 clean_label: bool = False):
        check_rate("poison_rate", poison_rate)
        check_rate("cover_rate", cover_rate)
        check_stages(stages)
        if clean_label and cover_rate > 0:
            raise ValueError("clean_label and cover_rate > 0 exclude each other: with clean labels every "
                             "triggered sample already keeps its true label")
        self.poison_rate, self.stages, self.cover_rate, self.clean_label = poison_rate, stages, cover_rate, clean_label
        self._poisoned: dict[str, object] = {}

    def poison_synthetic(self, synthetic, stage, seed):
        if self.stages not in ("both", stage):
            return synthetic
        poisoned, self._poisoned[stage] = self.poison(synthetic, seed)
        return poisoned

    def poison(self, synthetic, seed):
        """The poisoned copy of the synthetic set and the poisoned indices (the stage is already checked);
        cover samples (triggered, true label) are drawn among the samples that keep an eligible label."""
        if self.clean_label:
            target_only = dataclasses.replace(self.backdoor, mapping="one-to-one", source=self.backdoor.target)
            return poison_data(synthetic, self.trigger, target_only, self.poison_rate, seed, "fm-clean", relabel=False)
        poisoned, idx = poison_data(synthetic, self.trigger, self.backdoor, self.poison_rate, seed, "fm")
        if self.cover_rate > 0:
            poisoned, _ = poison_data(poisoned, self.trigger, self.backdoor, self.cover_rate, seed, "fm-cover",
                                      relabel=False)
        return poisoned, idx

    def poisoned_samples(self, stage):
        return self._poisoned.get(stage)

    def bound_fm(self):
        """The FM request this attack was bound to (for the attacks whose FM draws the triggered images)."""
        if self.fm is None:
            raise RuntimeError(f"{type(self).__name__} draws with the FM: bind(..., fm=request) first")
        return self.fm
