"""Run one experiment cell: ``python -m benchmarks.run --config cfg.yaml --set fl.rounds=3 --out runs/x``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.cli import (
    add_cell_arguments,
    cell_config,
    check_budget,
    check_out,
    sigterm_as_interrupt,
    writable_folder,
)
from fl_core.config import check_ready, not_applicable
from fl_core.schema import ConfigError, config_schema
from fl_core.storage import read_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    add_cell_arguments(parser)
    parser.add_argument("--out", help="output folder (default: runs/cells/<config hash>)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--schema", action="store_true", help="print the JSON Schema of a cell config and exit")
    args = parser.parse_args(argv)
    if args.schema:
        print(json.dumps(config_schema(), indent=2))
        return 0
    try:
        cfg = cell_config(args)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        check_budget([cfg], args.max_hours)
        check_ready(cfg)
        why = not_applicable(cfg)
        if why:
            raise ConfigError(f"defense.name: {why}")
        check_out(args.out)
        out = writable_folder(args.out or Path("runs") / "cells" / cfg.key())
        other = read_json(out / "record.json")
        if other is not None and other.get("key") != cfg.key():
            raise ConfigError(f"--out {str(out)!r} holds the record of another cell ({other.get('key')}); "
                              "choose another folder")
    except (ConfigError, KeyError, ImportError) as err:
        parser.exit(2, f"config error: {err}\n")
    from fl_core.fl import run_cell

    try:
        with sigterm_as_interrupt():
            record = run_cell(cfg, out)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing of this cell was kept; rerun the same command", file=sys.stderr)
        return 130
    m = record["metrics"]
    print(f"ACC {m['acc']:.2f}  ASR {m['asr']:.2f}  RA {m['ra']:.2f}  "
          f"({record['wall_seconds']:.0f} s) -> {out / 'record.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
