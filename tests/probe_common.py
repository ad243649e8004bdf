"""What tests/resume_probe.py and tests/frozen_probe.py share: their command line, and a real Trainer
built from it under torchrun.

    torchrun --nproc_per_node N tests/<probe>.py --report R.json --ds D --config C --set k=v ...
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from livr_ds.config import load_config  # noqa: E402
from livr_ds import distributed as dist  # noqa: E402
from livr_ds.train.trainer import Trainer  # noqa: E402


def start_trainer(resume: str):
    """(args, cfg, trainer): the probe's arguments parsed, the process group up, the Trainer built."""
    p = argparse.ArgumentParser()
    p.add_argument("--report", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--ds", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    device = dist.init()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {dist.rank()}] %(levelname)s %(name)s: %(message)s")
    return args, cfg, Trainer(cfg, args.ds, resume=resume, device=device)
