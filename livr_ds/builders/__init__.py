"""Builders of the paper's nine training tasks from their source datasets (`livr-ds data build`).

One module per source family (coco: jigsaw + localization, pixmo: counting, hpatches, artbench,
spair, funkpoint, mid, nights), `common` (seeding, prompts, drawing, sampling loop, manifest),
`dedup` (test-set de-duplication), `show` (`shards show`), `cli` (`add_data_commands`).
See docs/builders.md.
"""
