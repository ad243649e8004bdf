"""Task names: livr-ds's canonical names and BLINK's subtask names, in one place.

The writer (parquet ``sub_task`` -> task), the builders' dedup (task -> BLINK hub folder) and
``livr-ds table`` (Table 1 columns) all use this module, so a BLINK ``Object_Localization`` row
is task ``localization`` everywhere.
"""

from __future__ import annotations

import re

# The paper's nine tasks in its Table 1 column order (also the `data build` task names).
PAPER_TASKS = ("counting", "jigsaw", "localization", "visual_correspondence", "art_style",
               "semantic_correspondence", "functional_correspondence", "relative_reflectance",
               "visual_similarity")

# BLINK's subtask (hub folder / `sub_task` value) -> livr-ds task. The first nine are the paper's;
# the other five BLINK subtasks keep their own (normalised) names.
BLINK_SUBTASKS = {
    "Counting": "counting",
    "Jigsaw": "jigsaw",
    "Object_Localization": "localization",
    "Visual_Correspondence": "visual_correspondence",
    "Art_Style": "art_style",
    "Semantic_Correspondence": "semantic_correspondence",
    "Functional_Correspondence": "functional_correspondence",
    "Relative_Reflectance": "relative_reflectance",
    "Visual_Similarity": "visual_similarity",
    "Forensic_Detection": "forensic_detection",
    "IQ_Test": "iq_test",
    "Multi-view_Reasoning": "multi_view_reasoning",
    "Relative_Depth": "relative_depth",
    "Spatial_Relation": "spatial_relation",
}


def normalize(name: str) -> str:
    """Lower case, runs of anything but [a-z0-9] -> '_' ("Multi-view Reasoning" -> multi_view_reasoning)."""
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")


_BY_NORMALIZED = {normalize(k): v for k, v in BLINK_SUBTASKS.items()}


def canonical_task(name: str) -> str:
    """A task or BLINK subtask name -> livr-ds's task name (Object_Localization -> localization);
    names BLINK does not have are only normalised."""
    n = normalize(name)
    return _BY_NORMALIZED.get(n, n)


def blink_subtask(task: str) -> str | None:
    """livr-ds task -> BLINK's hub folder name (localization -> Object_Localization), None if none."""
    c = canonical_task(task)
    for sub, t in BLINK_SUBTASKS.items():
        if t == c:
            return sub
    return None
