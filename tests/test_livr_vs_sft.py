"""`livr-ds experiment livr-vs-sft` (livr_ds/experiments/livr_vs_sft.py, scenes.py): the data are
what they claim, the statistics are right on inputs with a known answer, and the --quick form runs
the whole pipeline (pre-training, three fine-tuning runs per seed through launch/train.py, eval,
latent analysis) and writes the schema docs/science.md describes."""

import json
from collections import Counter

import numpy as np
import pytest

from livr_ds.experiments import scenes
from livr_ds.experiments.livr_vs_sft import summarise


def test_count_scenes_hold_exactly_the_counted_squares_and_balanced_answers():
    samples = list(scenes.count_samples("train", 40, seed=3))
    assert Counter(s["answer"] for s in samples) == {"A": 10, "B": 10, "C": 10, "D": 10}
    for s in samples:
        cells = s["meta"]["cells"]
        assert len(cells) == scenes.GRID ** 2
        assert cells.count(scenes.TARGET) == "ABCD".index(s["answer"])
    assert [s["images"] for s in scenes.count_samples("train", 40, seed=3)] == [s["images"] for s in samples]
    assert all(s["question"] != "" for s in scenes.attribute_samples("train", 8))
    pre = list(scenes.attribute_samples("train", 24, seed=1))
    for s in pre:  # the asked cell holds what the answer says
        cell = s["meta"]["cells"][s["meta"]["quadrant"]]
        answer = s["choices"]["ABCDEF".index(s["answer"])]
        assert cell == answer if s["choices"] != ["yes", "no"] else (cell is not None) == (answer == "yes")
    assert not any("many" in s["question"] for s in pre)  # counting is never pre-trained


def test_summary_statistics_on_known_inputs():
    rng = np.random.default_rng(0)
    n, seed_list = 200, [0, 1, 2]
    correct = {}
    for s in seed_list:
        correct[("livr", "standard", s)] = np.ones(n)
        correct[("direct_sft", "standard", s)] = (rng.random(n) < 0.5).astype(float)
        correct[("latents_only", "standard", s)] = correct[("direct_sft", "standard", s)].copy()
    out = summarise(correct, ["direct_sft", "latents_only", "livr"],
                    {"direct_sft": ["standard"], "latents_only": ["standard"], "livr": ["standard"]}, seed_list, 500)
    livr = out["runs"]["livr"]["standard"]
    assert livr["mean"] == 100.0 and livr["ci95"] == [100.0, 100.0]
    sft = out["runs"]["direct_sft"]["standard"]
    assert sft["mean"] == pytest.approx(np.mean(list(sft["per_seed"].values())))
    assert sft["ci95"][0] < sft["mean"] < sft["ci95"][1] and 40 < sft["mean"] < 60
    d = out["differences"]["livr-direct_sft.standard"]
    assert d["ci95"][0] > 0 and d["seeds_ahead"] == 3 and d["mean"] == pytest.approx(100 - sft["mean"])
    same = out["differences"]["latents_only-direct_sft.standard"]
    assert same["mean"] == 0 and same["ci95"] == [0.0, 0.0] and same["seeds_ahead"] == 0 and same["seeds_tied"] == 3


def test_quick_experiment_runs_end_to_end(tmp_path):
    from livr_ds.cli import main

    out = tmp_path / "lvs"
    assert main(["experiment", "livr-vs-sft", "--quick", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["params"]["seeds"] == 2 and res["n_test"] == 16
    assert set(res["runs"]) == {"direct_sft", "latents_only", "livr"}
    assert set(res["runs"]["direct_sft"]) == {"standard"} and set(res["runs"]["livr"]) == {"standard", "bottleneck"}
    for by_mode in res["runs"].values():
        for r in by_mode.values():
            accs = list(r["per_seed"].values())
            assert len(accs) == 2 and r["mean"] == pytest.approx(sum(accs) / 2)
            assert r["ci95"][0] <= r["mean"] <= r["ci95"][1]
            assert all(a * 16 / 100 == pytest.approx(round(a * 16 / 100)) for a in accs)  # k of 16 samples
    for seed in (0, 1):  # each per-seed accuracy is the one its evaluation wrote
        for run in ("direct_sft", "livr"):
            ev = json.loads((out / "results" / f"{run}-seed{seed}.standard.json").read_text())
            assert ev["mean"] == pytest.approx(res["runs"][run]["standard"]["per_seed"][str(seed)])
    assert set(res["latent_analysis"]) == {"latents_only-seed0", "livr-seed0", "latents_only-seed1", "livr-seed1"}
    for a in res["latent_analysis"].values():
        for m in a.values():
            assert m["n"] == 6 and m["follow_donor"] + m["follow_recipient"] + m["neither"] == pytest.approx(1)
    # the fine-tuning runs trained LoRA on the pre-trained base, equal steps for the three runs
    livr = json.load(open(out / "runs" / "livr-seed0" / "stage2" / "export" / "final" / "livr.json"))
    assert livr["base_model"] == str(out / "runs" / "pretrain" / "stage2" / "export" / "final")
    steps = {}
    for run in ("direct_sft-seed0", "latents_only-seed0", "livr-seed0"):
        lines = [json.loads(x) for x in open(out / "runs" / run / "stage2" / "metrics.jsonl") if '"step"' in x]
        s1 = out / "runs" / run / "stage1" / "metrics.jsonl"
        extra = [json.loads(x) for x in open(s1) if '"step"' in x] if s1.exists() else []
        steps[run] = max(x["step"] for x in lines) + (max(x["step"] for x in extra) if extra else 0)
    assert len(set(steps.values())) == 1, steps
    assert "| LIVR | bottleneck |" in (out / "table.md").read_text()
    # a rerun with the same settings reuses every finished step
    assert main(["experiment", "livr-vs-sft", "--quick", "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert all(v == 0.0 for k, v in again["timings"].items() if k.startswith(("train_", "pretrain")))
    assert again["runs"] == res["runs"]
