"""FM-integrated federated learning on PyTorch Lightning: data, models, synthetic data, FL loop, metrics."""
from fl_core.config import CellConfig, ConfigError, load_config

__all__ = ["CellConfig", "ConfigError", "load_config", "run_cell"]


def run_cell(cfg, out_dir=None, log=print):
    """Run one experiment cell (see :func:`fl_core.fl.run_cell`)."""
    from fl_core.fl import run_cell as _run

    return _run(cfg, out_dir, log)
