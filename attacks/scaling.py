"""Model replacement / update scaling (Bagdasaryan et al. 2020)."""
from attacks import ATTACKS
from attacks.poisoning import ClientAttack


@ATTACKS.register("scaling")
class ModelReplacement(ClientAttack):
    """BadNets poisoning, then the malicious update (trained minus global) is multiplied by ``boost``
    so that it survives averaging (Bagdasaryan et al. use boost = clients per round / server lr)."""

    def __init__(self, boost: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        if boost <= 0:
            raise ValueError(f"boost must be > 0, got {boost}")
        self.boost = boost

    def poison_update(self, update, global_model, ctx):
        start, state = global_model.state_dict(), update.model.state_dict()
        for key, delta in update.delta(global_model).items():
            state[key].copy_(start[key] + self.boost * delta)
        return update
