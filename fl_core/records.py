"""A cell's ``record.json`` read back and trusted only when it is whole: its shape validates, its key is
the hash of the config it holds (and the key asked for), and the model files beside it load. Anything
else counts as missing, with a warning naming the file, so the cell is computed again.

Committed results carry no weights (``results/**/models/`` is not in git): a record without a
``models`` folder is trusted on its own; a ``models`` folder whose files do not load is not."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fl_core.schema import CellConfig, from_dict
from fl_core.storage import read_json, warn

Percent = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Metrics(BaseModel):
    acc: Percent
    asr: Percent
    ra: Percent


class Versions(BaseModel):
    model_config = ConfigDict(extra="allow")
    torch: str
    lightning: str
    git_commit: str | None


class Record(BaseModel):
    """The fields every reader of a record relies on (the rest is kept as it is)."""

    model_config = ConfigDict(extra="allow")
    key: Annotated[str, Field(pattern=r"^[0-9a-f]{12}$")]
    config: dict[str, Any]
    metrics: Metrics
    rounds: Annotated[list[dict[str, Any]], Field(min_length=1)]
    wall_seconds: Seconds
    defense_seconds: Seconds
    versions: Versions


def problem(record: Any, folder: Path, key: str | None) -> str | None:
    """Why the record in ``folder`` cannot be trusted, or None."""
    try:
        rec = Record.model_validate(record)
    except ValidationError as err:
        first = err.errors()[0]
        return f"{'.'.join(map(str, first['loc'])) or 'top level'}: {first['msg']}"
    if key is not None and rec.key != key:
        return f"it is the record of cell {rec.key}, not {key}"
    try:
        config_key = from_dict(CellConfig, rec.config).key()
    except Exception as err:  # noqa: BLE001 - any config that does not build is a broken record
        return f"its config does not build ({type(err).__name__})"
    if config_key != rec.key:
        return f"its config hashes to {config_key}, not its key {rec.key}"
    models = folder / "models"
    if models.is_dir():
        count = len(rec.config.get("model", {}).get("prototypes") or [None])  # one model per prototype
        for p in range(count):
            path = models / f"prototype{p}.pt"
            try:
                state = torch.load(path, weights_only=True)
            except Exception as err:  # noqa: BLE001 - zip, pickle, EOF and missing-file errors alike
                return f"{path.name} does not load ({type(err).__name__})"
            if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
                return f"{path.name} holds no model weights"
    return None


def read_record(folder: Path, key: str | None = None) -> dict | None:
    """The record of the cell in ``folder`` when it can be trusted (see the module doc), else None."""
    path = Path(folder) / "record.json"
    record = read_json(path)
    if record is None:
        return None
    why = problem(record, Path(folder), key)
    if why is not None:
        warn(f"{path} is not a whole record ({why}); the cell counts as not done")
        return None
    return record
