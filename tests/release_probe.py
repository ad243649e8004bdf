"""Run under torchrun by tests/test_handoff.py: launch/train.py's own main() with --stage all, watching
each Trainer built. When Stage 2's Trainer starts, is anything of Stage 1's (its engine, model,
optimizer) still alive after a garbage collection? Writes the answer to --report.

    torchrun --nproc_per_node N tests/release_probe.py --report R.json --ds D --config C --set k=v ...
"""

import gc
import json
import os
import sys
import weakref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "launch")]

import train as launch_train  # noqa: E402  launch/train.py

from livr_ds import distributed as dist  # noqa: E402
from livr_ds.train import trainer as trainer_module  # noqa: E402


def main() -> int:
    report = sys.argv[sys.argv.index("--report") + 1]
    argv = [a for i, a in enumerate(sys.argv[1:]) if a != "--report" and sys.argv[i] != "--report"]
    built, alive_at_start = [], []
    real_init = trainer_module.Trainer.__init__

    def watched_init(self, *args, **kwargs):
        gc.collect()
        alive_at_start.append([name for refs in built for name, ref in refs.items() if ref() is not None])
        real_init(self, *args, **kwargs)
        built.append({"engine": weakref.ref(self.engine), "model": weakref.ref(self.backbone.model),
                      "optimizer": weakref.ref(self.engine.optimizer), "trainer": weakref.ref(self)})

    trainer_module.Trainer.__init__ = watched_init
    code = launch_train.main(argv)
    if dist.is_main():
        with open(report, "w") as f:
            json.dump({"code": code, "trainers": len(built), "alive_at_start": alive_at_start}, f)
    return code


if __name__ == "__main__":
    sys.exit(main())
