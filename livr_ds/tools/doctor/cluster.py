"""Where the job runs: the SLURM commands and the current allocation, and free disk where
output.dir goes."""

from __future__ import annotations

import os
import shutil

from .environment import GiB
from .report import Findings


class ClusterChecks(Findings):
    def slurm(self) -> None:
        cmds = [c for c in ("sbatch", "srun", "scontrol", "squeue") if shutil.which(c)]
        job = os.environ.get("SLURM_JOB_ID")
        names = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NUM_NODES", "SLURM_JOB_NODELIST",
                 "SLURM_GPUS_ON_NODE", "SLURM_CPUS_PER_TASK", "SLURM_PROCID", "SLURM_RESTART_COUNT",
                 "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
        env = ", ".join(f"{k}={os.environ[k]}" for k in names if os.environ.get(k))
        if job:
            missing = [c for c in ("srun", "scontrol") if c not in cmds]
            self.add("FAIL" if missing else "ok", "SLURM", f"inside allocation: {env}",
                     f"{', '.join(missing)} not on PATH: slurm/train.sbatch needs them" if missing else "")
        elif cmds:
            self.add("ok", "SLURM", f"{', '.join(cmds)} found; not inside an allocation" + (f" ({env})" if env else ""))
        else:
            self.add("note", "SLURM", "no sbatch/srun here: launch with deepspeed or torchrun (slurm/ needs a cluster)"
                     + (f"; {env}" if env else ""))

    def disk(self) -> None:
        out = self.cfg.output.dir if self.cfg is not None else "runs"
        probe = os.path.abspath(out)
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        free = shutil.disk_usage(probe).free
        where = f"output.dir {out}" + ("" if probe == os.path.abspath(out) else f" (to be created under {probe})")
        if not os.access(probe, os.W_OK):
            self.add("FAIL", "disk", f"{where}: not writable", "set output.dir to a writable directory")
        elif free < GiB:
            self.add("FAIL", "disk", f"{where}: {free / GiB:.1f} GiB free", "free space or move output.dir")
        elif free < 10 * GiB:
            self.add("warn", "disk", f"{where}: {free / GiB:.1f} GiB free (checkpoints, exports and a merged model "
                     "of a 3B backbone need several GiB)")
        else:
            self.add("ok", "disk", f"{where}: {free / GiB:.0f} GiB free")
