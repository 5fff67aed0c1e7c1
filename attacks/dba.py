"""Distributed backdoor attack (DBA, Xie et al. 2020)."""
from attacks import ATTACKS
from attacks.poisoning import ClientAttack


@ATTACKS.register("dba")
class DBA(ClientAttack):
    """``num_malicious`` clients (default 4) each poison with one of the four spatially separated local
    patterns of the ``dba`` trigger (malicious client j stamps pattern j mod 4); the ASR test set uses the
    global trigger, all four together. Needs ``backdoor.trigger.kind: dba``."""

    requires_trigger = "dba"

    def __init__(self, num_malicious: int = 4, **kwargs):
        super().__init__(num_malicious=num_malicious, **kwargs)

    def local_trigger(self, client_id):
        return self.trigger.part(self._malicious.index(client_id) % 4)
