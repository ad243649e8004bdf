"""`Doctor`: every group of checks on one object, run in the order the screen shows them."""

from __future__ import annotations

from .cluster import ClusterChecks
from .environment import EnvironmentChecks
from .inputs import InputChecks
from .kernels import KernelChecks
from .packages import PackageChecks
from .report import Check


class Doctor(EnvironmentChecks, KernelChecks, PackageChecks, ClusterChecks, InputChecks):
    def run(self) -> list[Check]:
        # The environment checks come first: they set self.torch and self.gpus, which the rest read.
        for step in (self.python, self.torch_build, self.gpus_visible, self.bf16, self.nccl, self.flash_attn,
                     self.flex, self.deepspeed, self.versions, self.torchvision, self.slurm, self.disk,
                     self.model, self.data):
            try:
                step()
            except Exception as e:  # noqa: BLE001 - a check that crashes is itself the finding
                self.add("FAIL", step.__name__, f"the check itself failed: {type(e).__name__}: {e}")
        return self.checks
