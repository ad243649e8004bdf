"""Small, fully reproducible experiments that run the real pipeline end to end (training
subprocesses + evaluation) on CPU. `livr-ds experiment <name> --out DIR` runs one."""
