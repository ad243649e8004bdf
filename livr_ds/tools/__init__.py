"""Tools around training: `livr-ds bench` (bench/: measured ratios), `livr-ds doctor` (doctor/:
what a launch would need, checked before it starts) and `livr-ds plan` (memory_plan.py: the memory
model that picks a ZeRO config; not the epoch plan, which is data/plan.py)."""
