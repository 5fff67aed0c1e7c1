"""FM-integrated federated learning on PyTorch Lightning: data, models, synthetic data, FL loop, metrics."""
import os

# OpenMP threads that spin while waiting collapse throughput when another process shares the cores
# (fl_core/threads.py); must be set before torch loads its OpenMP runtime
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fl_core.config import load_config
from fl_core.schema import CellConfig, ConfigError  # noqa: E402

__all__ = ["CellConfig", "ConfigError", "load_config", "run_cell"]


def run_cell(cfg, out_dir=None, log=print):
    """Run one experiment cell (see :func:`fl_core.fl.run_cell`)."""
    from fl_core.fl import run_cell as _run

    return _run(cfg, out_dir, log)
