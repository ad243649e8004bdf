"""Builders of the paper's nine training tasks from their source datasets (`livr-ds data build`).

One module per source family (coco: jigsaw + localization, pixmo: counting, hpatches, artbench,
spair, funkpoint, mid, nights), each turning its source into `units.Pools` and handing them to
`build.build` (the sampling loop, shard writing, manifest). What they share: `seeding` (every
random choice from the seed), `splits` (keys to splits, balanced labels), `source` (source layout
and image decoding), `image_format` (sample image size and JPEG), `geometry` (boxes, spaced
points), `markers` (drawn points, boxes, labels), `prompts` (BLINK wording); `correspond` (the
point-correspondence sample). Then `dedup` (test-set de-duplication), `show` (`shards show`),
`cli` (`add_data_commands`).
See docs/builders.md.
"""
