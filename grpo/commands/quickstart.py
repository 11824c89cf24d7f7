"""`grpo quickstart`: make the tiny model and the arithmetic data (the config's training_file and
validation_file, those that do not exist yet), then train configs/quickstart.yaml."""

from __future__ import annotations

import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def add_arguments(p):
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="job YAML (default configs/quickstart.yaml)")
    p.add_argument("--output-dir", type=Path, default=None, help="run directory (default runs/quickstart-<time>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, as in `grpo train`")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from grpo.config import load_config, print_warnings
    from grpo.models.tiny_data import write_quickstart_data

    t0 = time.time()
    cfg = load_config(args.config, args.overrides)
    print_warnings(cfg)
    # the quickstart's data goes to the files the config names, and only to those that do not exist yet
    train = Path(cfg.training_file)
    val = Path(cfg.validation_file) if cfg.validation_file is not None else None
    missing = [p if p is not None and not p.is_file() else None for p in (train, val)]
    if any(missing):
        written = write_quickstart_data(*missing)
        print(f"wrote the quickstart data: {', '.join(str(p) for p in written if p is not None)}")
    from grpo.models.loading import resolve_model_path

    print(f"model: {resolve_model_path(cfg.local_model, progress=not args.no_progress)}")
    run_dir = args.output_dir or Path("runs") / f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}"
    from grpo.commands.train import train_and_report

    code = train_and_report(cfg, run_dir, progress=not args.no_progress)
    print(f"quickstart finished in {time.time() - t0:.0f} s (model and data included)", flush=True)
    return code
