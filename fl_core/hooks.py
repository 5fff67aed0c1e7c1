"""The typed hooks through which attacks and defenses act on the FL loop.

An attack or a defense overrides only the hooks it needs; every default is a no-op.
A defense receives what a real server has (client updates, the server's synthetic set,
its own state) and never test data: no hook's arguments carry it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from fl_core.data import ImageData

Stage = Literal["pretrain", "fusion"]
State = dict[str, torch.Tensor]


@dataclass
class ServerContext:
    """What the server knows in a round."""

    round: int  # 0 = before the first round (pre-training), then 1..rounds
    seed: int
    device: torch.device
    num_classes: int
    synthetic: ImageData  # the synthetic set the server distils on (as received from the FM)
    num_prototypes: int = 1
    rounds: int = 1  # total rounds of the run

    @property
    def accelerator(self) -> str:
        return "gpu" if self.device.type == "cuda" else "cpu"


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
        """Trained minus global floating-point parameters and buffers."""
        glob = global_model.state_dict()
        return {k: v - glob[k] for k, v in self.state().items() if v.is_floating_point()}


@dataclass
class FusionPlan:
    """What one prototype's distillation will use; a defense may edit it in ``on_fusion``."""

    prototype: int
    teachers: list[ClientUpdate]
    teacher_weights: torch.Tensor  # one non-negative weight per teacher
    synthetic: ImageData
    callbacks: list = field(default_factory=list)  # extra Lightning callbacks for the fusion Trainer


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

    def describe(self) -> dict:
        """Name and parameters, for the result record."""
        return describe(self)


class Defense:
    """Base class of defenses. ``consumes`` declares what server data the defense uses."""

    name: ClassVar[str] = "none"
    consumes: ClassVar[frozenset[str]] = frozenset()  # subset of {"updates", "synthetic"}
    parameter_space: ClassVar[bool] = False  # compares parameters across clients (same architecture only)

    def check(self, cfg) -> None:
        """Raise ValueError when this plugin cannot run on the resolved cell config ``cfg`` (called by the
        config check, before any compute); the default accepts every cell."""

    def before_round(self, global_model: nn.Module, prototype: int, ctx: ServerContext) -> None:
        """Called before the clients receive a copy of the global model."""

    def changes_broadcast(self, round_idx: int) -> bool:
        """Whether, this round, the clients receive something other than the plain global weights
        (``before_round`` changed them, or hooks on the model act in the clients' training). Asked after
        ``before_round``; while False for round 1, round 1's client models are shared with other cells
        through the stage cache. Default: True for any defense that overrides ``before_round``."""
        return type(self).before_round is not Defense.before_round

    def filter_update(self, update: ClientUpdate, global_model: nn.Module, ctx: ServerContext) -> ClientUpdate | None:
        """Inspect or change one update; return None to drop it."""
        return update

    def aggregate(self, updates: list[ClientUpdate], global_model: nn.Module, ctx: ServerContext) -> State | None:
        """Replace the aggregation of one prototype's updates; None keeps the sample-weighted FedAvg."""
        return None

    def on_fusion(self, plan: FusionPlan, global_model: nn.Module, ctx: ServerContext) -> FusionPlan:
        """Edit the distillation plan: teachers, their weights, the data, Lightning callbacks."""
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


def describe(plugin) -> dict:
    """A plugin's registered name and its public, JSON-friendly parameters; a parameter listed in the
    plugin's ``omit_at_default`` (added after results were published) is left out while at that default,
    so earlier cells keep their config keys."""
    omit = getattr(plugin, "omit_at_default", {})
    params = {k: v for k, v in vars(plugin).items()
              if not k.startswith("_") and k not in ("backdoor", "trigger", "fm")
              and isinstance(v, (int, float, str, bool, list, tuple, dict, type(None)))
              and not (k in omit and v == omit[k])}
    return {"name": plugin.name, **params}
