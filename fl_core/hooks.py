"""The typed hooks through which attacks and defenses act on the FL loop.

An attack or a defense overrides only the hooks it needs; every default is a no-op.
A defense receives what a real server has (client updates, the server's synthetic set,
its own state) and never test data: no hook's arguments carry it.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from fl_core.data import ImageData

Stage = Literal["pretrain", "fusion"]
State = dict[str, torch.Tensor]


CONSUMABLE = ("updates", "synthetic")  # what a defense may declare in ``consumes``


class Withheld:
    """Stands in for server data a defense did not declare in ``consumes``: any use raises."""

    def __init__(self, defense: str, what: str):
        self._why = (f"defense {defense!r} reads {what} but does not declare {what.split('.')[-1]!r} in "
                     f"consumes (valid: {', '.join(CONSUMABLE)})")

    def __getattr__(self, name):
        raise PermissionError(object.__getattribute__(self, "_why"))

    def __iter__(self):
        raise PermissionError(self._why)

    def __len__(self):
        raise PermissionError(self._why)

    def __getitem__(self, index):
        raise PermissionError(self._why)


@dataclass
class ClientTraining:
    """The local training the server prescribes to benign clients."""

    optim: object  # OptimConfig
    epochs: int
    augment: bool


@dataclass
class ServerContext:
    """What the server knows in a round. ``synthetic`` is the set as the FM delivered it (which samples
    an attack poisoned is not part of it); ``client_training`` is what the server prescribes to clients;
    ``pretraining`` is the server's own recipe for training on synthetic data; ``report`` is the decision channel: what a defense decided lands in the round's row of ``rounds.csv``."""

    round: int  # 0 = before the first round (pre-training), then 1..rounds
    seed: int
    device: torch.device
    num_classes: int
    synthetic: ImageData | None
    num_prototypes: int = 1
    rounds: int = 1  # total rounds of the run
    client_training: ClientTraining | None = None
    pretraining: ClientTraining | None = None  # the server's own pre-training recipe on synthetic data
    decisions: dict = field(default_factory=dict)

    @property
    def accelerator(self) -> str:
        return "gpu" if self.device.type == "cuda" else "cpu"

    def report(self, **values) -> None:
        """Record decisions of this round (JSON-friendly values: client ids, weights, norms, bound sizes;
        ``flagged_synthetic``: indices of synthetic samples judged poisoned, scored by the runner)."""
        self.decisions.update(values)

    def restricted(self, defense: "Defense") -> "ServerContext":
        """The view of this context that ``defense`` may read: undeclared data is withheld."""
        if "synthetic" in defense.consumes:
            return self
        return dataclasses.replace(self, synthetic=Withheld(defense.name, "ctx.synthetic"))


@dataclass
class ClientUpdate:
    """One client's result of local training."""

    client_id: int
    prototype: int
    num_samples: int
    model: nn.Module  # the trained local model (a teacher during fusion)

    def state(self) -> State:
        return self.model.state_dict()

    def delta(self, global_model: nn.Module) -> State:
        """Trained minus global values of the trainable parameters (BatchNorm statistics excluded)."""
        glob, params = global_model.state_dict(), {name for name, _ in global_model.named_parameters()}
        return {k: v - glob[k] for k, v in self.state().items() if k in params}


@dataclass
class Aggregation:
    """One prototype's aggregation result, which fusion honours: the admitted updates (as the defense
    transformed them: clipped, rescaled, noised) are the distillation's teachers, with ``weights``.

    ``weights``: one trust value >= 0 per admitted update; its weight in the teacher ensemble, and times
    ``num_samples`` its weight in FedAvg. ``state``: the new global state; None means that FedAvg."""

    updates: list[ClientUpdate]
    weights: torch.Tensor
    state: State | None = None

    def admit(self, index: list[int], weights: torch.Tensor | None = None, state: State | None = None) -> "Aggregation":
        """The aggregation restricted to ``updates[index]`` (optionally new weights for them, a new state)."""
        kept = self.weights[index] if weights is None else weights
        return Aggregation([self.updates[i] for i in index], kept.float(), state)

    def teachers(self) -> dict[int, float]:
        """client id -> teacher weight of the admitted updates with a positive weight."""
        return {u.client_id: float(w) for u, w in zip(self.updates, self.weights) if w > 0}


@dataclass
class FusionPlan:
    """What one prototype's distillation will use; a defense may edit it in ``on_fusion``: the teachers'
    weights (0 silences a teacher), ``keep`` (which synthetic samples are distilled on; the samples it
    leaves out count as flagged), per sample the weight of its label in the CE term (``label_weight``)
    and classes masked out of its distillation target (``target_mask``: the teacher logit of a masked
    class is pushed to -1e4), and extra Lightning callbacks. The teachers themselves come from the
    aggregations (``Aggregation.updates``)."""

    prototype: int
    teachers: list[ClientUpdate]
    teacher_weights: torch.Tensor  # one non-negative weight per teacher
    keep: torch.Tensor  # bool, one per sample of ctx.synthetic
    callbacks: list = field(default_factory=list)  # extra Lightning callbacks for the fusion Trainer
    label_weight: torch.Tensor | None = None  # float (N,) over ctx.synthetic; None: every label counts 1
    target_mask: torch.Tensor | None = None  # bool (N, classes) over ctx.synthetic; None: nothing masked


class Attack:
    """Base class of attacks. ``malicious_clients`` picks who is compromised (none by default).

    Before use, the FL loop calls ``bind`` with the cell's backdoor spec and trigger, which every
    attack shares with the ASR test set, and with the request the server sends the FM (an attack that
    compromises the FM itself may query it). ``requires_provider`` names the only synthetic provider
    such an attack works with, ``requires_trigger`` the only trigger kind; the config check enforces both.
    """

    name: ClassVar[str] = "none"
    requires_provider: ClassVar[str | None] = None
    requires_trigger: ClassVar[str | None] = None  # the only ``backdoor.trigger.kind`` it works with
    backdoor = None  # BackdoorConfig, set by bind()
    trigger = None  # trigger object, set by bind()
    fm = None  # SyntheticRequest, set by bind()

    def bind(self, backdoor, trigger, fm=None) -> None:
        self.backdoor, self.trigger, self.fm = backdoor, trigger, fm

    def check(self, cfg) -> None:
        """Raise ValueError when this plugin cannot run on the resolved cell config ``cfg`` (called by the
        config check, before any compute); the default accepts every cell."""

    def malicious_clients(self, num_clients: int, seed: int) -> list[int]:
        return []

    def select_clients(self, selected: list[int], round_idx: int, num_clients: int, seed: int) -> list[int]:
        """Adjust the round's sampled clients (e.g. force malicious participation); default unchanged."""
        return selected

    def poison_synthetic(self, synthetic: ImageData, stage: Stage, seed: int) -> ImageData:
        """Alter the FM's synthetic set used at ``stage`` (pre-training or fusion)."""
        return synthetic

    def poison_client_data(self, client_id: int, data: ImageData, seed: int) -> ImageData:
        """Alter a malicious client's local data (called for malicious clients only)."""
        return data

    def poison_update(self, update: ClientUpdate, global_model: nn.Module, ctx: ServerContext) -> ClientUpdate:
        """Alter a malicious client's update before the server sees it."""
        return update

    def local_epochs(self, client_id: int, benign_epochs: int) -> int:
        """How many local epochs a malicious client trains (attackers often train longer)."""
        return benign_epochs

    def training_callbacks(self, client_id: int, global_model: nn.Module, ctx: ServerContext) -> list:
        """Lightning callbacks for a malicious client's local training (e.g. a per-step projection)."""
        return []

    def poisoned_samples(self, stage: Stage) -> torch.Tensor | None:
        """Indices of the synthetic samples this attack poisoned for ``stage``: the ground truth against
        which the runner scores a defense's flags (never shown to a defense); None when none or unknown."""
        return None

    def describe(self) -> dict:
        """Name and parameters, for the result record."""
        return describe(self)


class Defense:
    """Base class of defenses; override only the hooks you need (every default changes nothing).

    ``consumes`` declares what server data the defense reads: ``updates`` (client models, in
    ``filter_update``, ``aggregate`` and ``plan.teachers``) and/or ``synthetic`` (``ctx.synthetic``);
    the loop withholds what is not declared. The hooks run in the order of a round's stages:
    ``eligible_clients`` -> ``before_round`` -> (local training) -> ``filter_update`` -> ``aggregate``
    -> ``on_fusion`` -> ``after_round``. ``ctx.report(...)`` records what was decided."""

    name: ClassVar[str] = "none"
    consumes: ClassVar[frozenset[str]] = frozenset()  # subset of CONSUMABLE
    parameter_space: ClassVar[bool] = False  # compares parameters across clients (same architecture only)

    def check(self, cfg) -> None:
        """Raise ValueError when this plugin cannot run on the resolved cell config ``cfg`` (called by the
        config check, before any compute); the default accepts every cell."""

    def eligible_clients(self, clients: list[int], ctx: ServerContext) -> list[int]:
        """The clients the round may sample from (a reputation defense leaves out those it banned)."""
        return clients

    def before_round(self, global_model: nn.Module, prototype: int, ctx: ServerContext) -> None:
        """Called before the clients receive a copy of the global model."""

    def changes_broadcast(self, round_idx: int) -> bool:
        """Whether, this round, the clients receive something other than the plain global weights
        (``before_round`` changed them, or hooks on the model act in the clients' training). Asked after
        ``before_round``; while False for round 1, round 1's client models are shared with other cells
        through the stage cache. Default: True for any defense that overrides ``before_round``."""
        return type(self).before_round is not Defense.before_round

    def filter_update(self, update: ClientUpdate, global_model: nn.Module, ctx: ServerContext) -> ClientUpdate | None:
        """Inspect or change one update; return None to reject it."""
        return update

    def aggregate(self, agg: Aggregation, global_model: nn.Module, ctx: ServerContext) -> Aggregation:
        """Decide one prototype's aggregation: which updates are admitted (and teach during fusion), as
        what (transform their models), with what weight, and optionally the new global state."""
        return agg

    def on_fusion(self, plan: FusionPlan, global_model: nn.Module, ctx: ServerContext) -> FusionPlan:
        """Edit the distillation plan: teacher weights, which synthetic samples, Lightning callbacks."""
        return plan

    def after_round(self, global_model: nn.Module, prototype: int, ctx: ServerContext) -> nn.Module:
        """Transform a fused global model before evaluation and broadcast."""
        return global_model

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Learned state worth saving beside the final models (e.g. activation bounds)."""
        return {}

    def describe(self) -> dict:
        """Name and parameters, for the result record."""
        return describe(self)

    @classmethod
    def check_consumes(cls) -> None:
        """Raise ValueError when ``consumes`` names unknown data or misses ``updates`` although the defense
        overrides a hook that reads client updates."""
        unknown = set(cls.consumes) - set(CONSUMABLE)
        if unknown:
            raise ValueError(f"consumes names {sorted(unknown)}; valid: {', '.join(CONSUMABLE)}")
        reads = [h for h in ("filter_update", "aggregate") if getattr(cls, h) is not getattr(Defense, h)]
        if reads and "updates" not in cls.consumes:
            raise ValueError(f"overrides {', '.join(reads)} (client updates) but does not declare 'updates' "
                             "in consumes")


class DefenseChain(Defense):
    """Several defenses applied in order at every hook (``defense: [{name: krum}, {name: actbound}]``);
    each member sees only the data it declares. A chain of one behaves exactly as its member."""

    def __init__(self, members: list[Defense]):
        if not members:
            raise ValueError("a defense chain needs at least one defense")
        self.members = members
        self.name = "+".join(m.name for m in members)
        self.consumes = frozenset().union(*(m.consumes for m in members))
        self.parameter_space = any(m.parameter_space for m in members)

    def check(self, cfg) -> None:
        for m in self.members:
            m.check(cfg)

    def eligible_clients(self, clients, ctx):
        for m in self.members:
            clients = m.eligible_clients(clients, ctx.restricted(m))
        return clients

    def before_round(self, global_model, prototype, ctx):
        for m in self.members:
            m.before_round(global_model, prototype, ctx.restricted(m))

    def changes_broadcast(self, round_idx):
        return any(m.changes_broadcast(round_idx) for m in self.members)

    def filter_update(self, update, global_model, ctx):
        for m in self.members:
            if update is None:
                return None
            update = m.filter_update(update, global_model, ctx.restricted(m))
        return update

    def aggregate(self, agg, global_model, ctx):
        for m in self.members:
            agg = m.aggregate(agg, global_model, ctx.restricted(m))
        return agg

    def on_fusion(self, plan, global_model, ctx):
        for m in self.members:
            if "updates" in m.consumes:
                plan = m.on_fusion(plan, global_model, ctx.restricted(m))
            else:  # the teachers are client models: withheld, and restored afterwards
                teachers = plan.teachers
                plan = m.on_fusion(dataclasses.replace(plan, teachers=Withheld(m.name, "plan.teachers")),
                                   global_model, ctx.restricted(m))
                plan.teachers = teachers
        return plan

    def after_round(self, global_model, prototype, ctx):
        for m in self.members:
            global_model = m.after_round(global_model, prototype, ctx.restricted(m))
        return global_model

    def state_dict(self):
        if len(self.members) == 1:
            return self.members[0].state_dict()
        return {f"{i}/{k}": v for i, m in enumerate(self.members) for k, v in m.state_dict().items()}

    def describe(self):
        if len(self.members) == 1:
            return self.members[0].describe()
        return {"name": self.name, "chain": [m.describe() for m in self.members]}


def public_params(plugin, constructor_only: bool = False) -> dict:
    """A plugin's public, JSON-friendly parameters, every one explicit; with ``constructor_only``, only
    those its constructor takes (what a validated config holds, to build it again)."""
    params = {k: v for k, v in vars(plugin).items()
              if not k.startswith("_") and k not in ("backdoor", "trigger", "fm", "name")
              and isinstance(v, (int, float, str, bool, list, tuple, dict, type(None)))}
    if constructor_only:
        signature = inspect.signature(type(plugin)).parameters.values()
        if not any(p.kind is p.VAR_KEYWORD for p in signature):
            params = {k: v for k, v in params.items() if k in {p.name for p in signature}}
    return params


def without_omitted(plugin_class, params: dict) -> dict:
    """``params`` less those listed in the plugin's ``omit_at_default`` (added after results were
    published, or retired at a value that changed nothing) that hold that value: what a config key and a
    record's description leave out, so that earlier cells keep their keys. A config keeps them explicit:
    the class default may differ."""
    omit = getattr(plugin_class, "omit_at_default", {})
    return {k: v for k, v in params.items() if not (k in omit and v == omit[k])}


def describe(plugin) -> dict:
    """A plugin's registered name and its public parameters, less those at their ``omit_at_default``."""
    return {"name": plugin.name, **without_omitted(plugin, public_params(plugin))}
