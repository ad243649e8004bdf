"""Run under torchrun by tests/test_configs.py: launch/train.py's own main() once per shipped
experiment YAML, in one process (the model, engine and data of each are built from scratch; a
process per config would spend most of the suite's time importing). Writes {config: exit code}.

    torchrun --nproc_per_node 1 tests/configs_probe.py --report R.json --plan P.json
    P.json: [{"config": ..., "argv": [...]}, ...]
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "launch")]

import train as launch_train  # noqa: E402  launch/train.py

from livr_ds import distributed as dist  # noqa: E402


def main() -> int:
    report = sys.argv[sys.argv.index("--report") + 1]
    with open(sys.argv[sys.argv.index("--plan") + 1]) as f:
        plan = json.load(f)
    codes = {}
    for item in plan:
        print(f"configs_probe: {item['config']}", file=sys.stderr, flush=True)
        codes[item["config"]] = launch_train.main(item["argv"])
    if dist.is_main():
        with open(report, "w") as f:
            json.dump(codes, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
