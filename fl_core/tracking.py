"""Per-round metrics through a Lightning logger (``runtime.logger``): a CSV file by default, TensorBoard or
MLflow with the ``tracking`` extra, or none. The record (``record.json``) stays the source of the
reports; the log is for watching a run and for a researcher's own tools."""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

LOGGERS = ("csv", "tensorboard", "mlflow", "none")
NEEDS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # logger -> the module it needs


def missing_module(kind: str) -> str | None:
    """The module ``kind`` needs that is not installed, else None."""
    module = NEEDS.get(kind)
    return module if module and importlib.util.find_spec(module) is None else None


def round_logger(kind: str, out_dir: str | Path | None, run_name: str, params: dict):
    """A Lightning logger writing under ``<out_dir>/logs`` (emptied first: a rerun replaces the log), with
    ``params`` (the flattened cell config) as its hyperparameters; None for ``none`` or no folder."""
    if kind == "none" or out_dir is None:
        return None
    from lightning.pytorch import loggers

    folder = Path(out_dir) / "logs"
    shutil.rmtree(folder, ignore_errors=True)
    if kind == "csv":
        logger = loggers.CSVLogger(save_dir=out_dir, name="logs", version="")
    elif kind == "tensorboard":
        logger = loggers.TensorBoardLogger(save_dir=out_dir, name="logs", version="", default_hp_metric=False)
    else:
        logger = loggers.MLFlowLogger(experiment_name="fmfl", run_name=run_name,
                                      tracking_uri=(folder / "mlruns").resolve().as_uri())
    logger.log_hyperparams(params)
    return logger


def log_round(logger, row: dict) -> None:
    """The round's scalar metrics and timings (numbers only) at step = round."""
    if logger is None:
        return
    scalars = {k: float(v) for k, v in row.items()
               if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    logger.log_metrics(scalars, step=row["round"])
    logger.save()


def flatten(data: dict, prefix: str = "") -> dict:
    """Nested config dicts -> ``{"a.b": value}``; plugin parameters, lists and other mappings as JSON text
    (one column or parameter each, what tables and trackers take)."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("params", "options", "class_prompts"):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return out
