"""The bottleneck proof end to end, shortened: the same command, data generator, training
subprocesses (launch/train.py, DeepSpeed, shards, exports), evaluation modes, probes and table as
`livr-ds experiment bottleneck-proof`, with a few optimizer steps instead of hundreds.

The shortened run is far too short for the model to learn the task (that takes hundreds of
steps, docs/evaluation.md), so this test checks the artefacts and their consistency, not the
effect; the full run's measured table is in docs/evaluation.md.
"""

import json
import os

import pytest

from livr_ds.experiments import synthetic
from livr_ds.experiments.bottleneck_proof import RUNS, band, checks

pytestmark = pytest.mark.timeout(900)


def test_synthetic_task_is_balanced_and_reproducible():
    a = list(synthetic.samples("test", 8, seed=3))
    b = list(synthetic.samples("test", 8, seed=3))
    assert a == b
    assert sorted(s["answer"] for s in a) == list("AABBCCDD")
    assert all(s["choices"] == list(synthetic.COLOURS) and s["meta"]["colour"] == s["choices"][ord(s["answer"]) - 65]
               for s in a)
    assert list(synthetic.samples("train", 4, seed=3)) != list(synthetic.samples("test", 4, seed=3))


def test_checks_read_the_finding():
    res = lambda v: {"mean": v}  # noqa: E731
    shown = {("livr", "bottleneck", "generate"): res(80.0), ("latents_only", "bottleneck", "generate"): res(27.0),
             ("latents_only", "bottleneck", "likelihood"): res(24.0),
             ("livr", "bottleneck_no_latents", "generate"): res(0.0),  # unparseable answers
             ("livr", "bottleneck_no_latents", "likelihood"): res(26.5)}
    assert checks(shown, 200, 25.0)["finding_shown"] is True
    assert band(200) == pytest.approx(9.19, abs=0.01)
    for key, value in ((("latents_only", "bottleneck", "generate"), 60.0),
                       (("livr", "bottleneck_no_latents", "likelihood"), 5.0),  # far below chance: not chance
                       (("livr", "bottleneck", "generate"), 40.0)):
        assert checks({**shown, key: res(value)}, 200, 25.0)["finding_shown"] is False
    missing = dict(shown)
    del missing[("latents_only", "bottleneck", "likelihood")]
    assert checks(missing, 200, 25.0)["latents_only_bottleneck_at_chance"]["passed"] is None


def test_shortened_proof_end_to_end(tmp_path, capsys):
    from livr_ds.cli import build_parser

    parser = build_parser()
    out = tmp_path / "proof"
    args = parser.parse_args(["experiment", "bottleneck-proof", "--out", str(out), "--stage1-steps", "6",
                              "--stage2-steps", "3", "--batch", "8",
                              "--warmup", "2", "--n-val", "8", "--n-test", "16", "--probe-images", "1"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out

    with open(out / "data" / "manifest.json") as f:
        splits = json.load(f)["splits"]
    assert {k: v["total"] for k, v in splits.items()} == {"train": 48, "val": 8, "test": 16}

    expected = {(run, mode) for run, _, _, _, modes in RUNS for mode in modes}
    assert len(expected) == 10
    for run, name, k, two_stage, modes in RUNS:
        run_dir = out / "runs" / run
        assert (run_dir / "stage2" / "DONE").exists()
        assert (run_dir / "stage2" / "export" / "final" / "livr.json").exists()
        assert (run_dir / "stage1" / "DONE").exists() == two_stage
        with open(run_dir / "stage2" / "export" / "final" / "livr.json") as f:
            meta = json.load(f)
        assert meta["latents"]["num"] == k and meta["merged"] is True and meta["policy"] == "standard"
        with open(run_dir / "stage2" / "metrics.jsonl") as f:
            steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
        assert max(steps) == (3 if two_stage else 9)  # S2 for LIVR's Stage 2; S1 + S2 for the others
        if two_stage:
            with open(run_dir / "stage1" / "metrics.jsonl") as f:
                assert max(json.loads(line)["step"] for line in f if '"loss"' in line) == 6
        if two_stage:
            with open(run_dir / "stage1" / "config.yaml") as f:
                assert "bottleneck" in f.read()
        for mode in modes:
            with open(out / "results" / f"{run}.{mode}.likelihood.json") as f:
                forced = json.load(f)
            assert forced["scoring"] == "likelihood" and forced["parse_failures"]["total"] == 0
            assert forced["name"] == f"{name} [forced choice]" and forced["n"] == 16
            with open(out / "results" / f"{run}.{mode}.json") as f:
                res = json.load(f)
            assert res["name"] == name and res["mode"] == mode and res["n"] == 16 and res["scoring"] == "generate"
            assert res["provenance"]["latents_fed"] == (k if mode in ("standard", "bottleneck") else 0)
            assert os.path.exists(out / "results" / f"{run}.{mode}.predictions.jsonl")
            if k and mode in ("standard", "bottleneck"):
                assert 0 <= res["probe"]["answer_to_latent"] <= 1
                pngs = os.listdir(res["probe"]["heatmaps"])
                assert len(pngs) == 1 and pngs[0].endswith(".png")

    with open(out / "proof.json") as f:
        proof = json.load(f)
    assert set(proof["accuracy"]) == {f"{r}.{m}{s}" for r, m in expected for s in ("", ".likelihood")}
    assert set(proof["checks"]) == {"livr_bottleneck_well_above_chance", "latents_only_bottleneck_at_chance",
                                    "livr_bottleneck_no_latents_at_chance", "finding_shown"}
    assert set(proof["probes"]) == {"latents_only.standard", "latents_only.bottleneck", "livr.standard",
                                    "livr.bottleneck"}
    assert proof["timings"]["total_s"] > 0
    table = (out / "table.md").read_text()
    for row in ("| Direct SFT |", "| Latents only (bottleneck) |", "| LIVR (bottleneck_no_latents) |",
                "| Run | standard | no_latents | bottleneck | bottleneck_no_latents |", "| LIVR [forced choice] |"):
        assert row in table
    assert "finding shown" in printed
