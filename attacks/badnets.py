"""BadNets data poisoning by malicious clients (Gu et al. 2017); the predecessors' BD-FL with one client."""
from attacks import ATTACKS
from attacks.poisoning import ClientAttack


@ATTACKS.register("badnets")
class BadNets(ClientAttack):
    """Malicious clients train on data of which ``poison_rate`` carries the cell's trigger
    (``backdoor.trigger``: a patch by default, a blend for the Blend attack), relabelled to the target.
    No weight scaling."""
