"""Evaluation: one loop for `livr-ds eval`, training's validation and the experiments.

    modes.py       the paper's test-time variants (input x mask)
    loop.py        evaluate(): samples exactly once across ranks -> records; loading an export
    generate.py    greedy answers under any mask (KV-cached; the recompute reference)
    scoring.py     answer parsing, records, accuracy per task, parse failures
    probes.py      answer -> latent attention, latent -> image heat maps
    provenance.py  what a results file records about the checkpoint, data and machine
    table.py       results files as the paper's Table 1
    cli.py         `livr-ds eval`, `livr-ds table`, launch/eval.py
"""
