"""Seeing what happened: `livr-ds report` on a demo run (finished, interrupted, two side by side),
the table and next commands `launch/train.py --stage all` prints at its end, and `livr-ds doctor`.

One small demo run (tiny Qwen2.5-VL, 2 tasks, 1 epoch per stage, then one eval with attention
probes) is shared by every test of this module."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from livr_ds import cli
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_dirs):
    tmp = tmp_path_factory.mktemp("report")
    data, run = tmp / "demo_data", tmp / "demo"
    subprocess.run([sys.executable, "-m", "livr_ds.cli", "shards", "demo", "--out", str(data), "--n-train", "4",
                    "--n-val", "2", "--n-test", "2", "--tasks", "counting", "localization", "--no-progress"],
                   check=True, capture_output=True, cwd=ROOT)
    sets = [f"model.path={tiny_dirs['qwen2_5_vl']}", f"data.train=[{data}]", f"data.val=[{data}]",
            f"output.dir={run}", "logging.wandb=disabled", "logging.every_steps=1", "logging.progress_bar=false",
            "schedule.stage1_epochs=1", "schedule.stage2_epochs=1", "data.num_workers=1", "data.val_max_samples=4",
            "optim.micro_batch_size=2", "optim.global_batch_size=4"]
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port", "29951",
            os.path.join(ROOT, "launch", "train.py"), "--config", os.path.join(ROOT, "configs", "demo.yaml"),
            "--stage", "all"]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    # An evaluation with attention probes, where the report looks for results (RUN/results/).
    assert cli.main(["eval", "--ckpt", str(run / "stage2"), "--data", str(data), "--split", "test",
                     "--out", str(run / "results" / "livr.json"), "--probe", "attention", "--probe-images", "1"]) == 0
    return {"tmp": tmp, "data": str(data), "run": run, "stdout": r.stdout, "sets": sets}


def _val_rows(stage_dir) -> list[dict]:
    """The validation rows of a metrics.jsonl, complete lines only (what the report must show)."""
    with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
        lines = [ln for ln in f if ln.endswith("\n")]
    return [row for row in map(json.loads, lines) if "val_accuracy" in row]


def _table_row(text: str, label: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {label} "))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def _expected(row: dict) -> list[str]:
    return [f"{row['val_counting']:.2f}", f"{row['val_localization']:.2f}", f"{row['val_accuracy']:.2f}"]


def _check_files(out) -> tuple[str, str]:
    """Every PNG decodes and is referenced by the HTML (inline) and the markdown (relative link)."""
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    pngs = sorted(p for p in out.rglob("*.png"))
    assert {"training.png", "validation.png", "throughput.png"} <= {p.name for p in pngs}
    for p in pngs:
        with Image.open(p) as im:
            im.load()
            assert im.size[0] > 100 and im.size[1] > 100
        rel = p.relative_to(out).as_posix()
        assert base64.b64encode(p.read_bytes()).decode() in html, rel
        assert f'data-file="{rel}"' in html and f"]({rel})" in md, rel
    assert "<img src=\"http" not in html and "src=\"file" not in html  # self-contained
    return html, md


def test_stage_all_prints_where_the_table_and_next_commands(demo):
    out, run = demo["stdout"], demo["run"]
    assert f"{run}/stage1/" in out and f"{run}/stage2/" in out
    assert "| Checkpoint | Counting | Localization | Mean |" in out
    for stage in (1, 2):
        (row,) = _val_rows(run / f"stage{stage}")
        for kind in ("best", "final"):
            assert _table_row(out, f"stage {stage} {kind} (epoch 1, step {row['step']})") == _expected(row)
    assert f"livr-ds eval --ckpt {run}/stage2 --data {demo['data']} --split test" in out
    assert f"livr-ds report {run}" in out


def test_report_of_a_finished_run(demo, tmp_path):
    out = tmp_path / "report"
    assert cli.main(["report", str(demo["run"]), "--out", str(out)]) == 0
    html, md = _check_files(out)
    for stage in (1, 2):
        (row,) = _val_rows(demo["run"] / f"stage{stage}")
        for kind in ("best", "final"):
            assert _table_row(md, f"stage {stage} {kind} (epoch 1, step {row['step']})") == _expected(row)
    assert "| demo | 2 | standard | done |" in md
    # the eval results, the paper's numbers on the same tasks (Table 1, Qwen2.5-VL-3B), the heat map
    res = json.loads((demo["run"] / "results" / "livr.json").read_text())
    assert _table_row(md, "livr") == [f"{res['per_task'][t]['accuracy']:.2f}" for t in ("counting", "localization")] \
        + [f"{res['mean']:.2f}"]
    assert _table_row(md, "paper: LIVR (Qwen2.5-VL-3B-Instruct)") == ["63.64", "79.51", "71.58"]
    assert len(list((out / "probes").rglob("*.png"))) == 1
    assert "stage: 2" in md and "```yaml" in md  # the resolved config (stage 2 as a diff of stage 1)
    assert "Resolved config" in html and "paper: LIVR" in html


def test_report_of_an_interrupted_run_and_two_runs_side_by_side(demo, tmp_path):
    cut = tmp_path / "demo-interrupted"
    shutil.copytree(demo["run"], cut, ignore=shutil.ignore_patterns("report"))
    os.remove(cut / "stage2" / "DONE")
    shutil.rmtree(cut / "stage2" / "export" / "final")
    metrics = cut / "stage2" / "metrics.jsonl"
    text = metrics.read_text()
    last = text.rstrip("\n").rfind("\n") + 1  # the last line (the epoch's validation), cut in the middle
    metrics.write_text(text[:last + (len(text) - last) // 2])
    assert not metrics.read_text().endswith("\n")

    out = tmp_path / "one"
    assert cli.main(["report", str(cut), "--out", str(out)]) == 0
    _, md = _check_files(out)
    assert "| demo-interrupted | 2 | standard | running or interrupted (no DONE); 1 unreadable line(s) skipped |" in md
    (row1,) = _val_rows(cut / "stage1")
    assert _table_row(md, f"stage 1 best (epoch 1, step {row1['step']})") == _expected(row1)
    assert _val_rows(cut / "stage2") == [] and "| stage 2 " not in md  # its validation line was cut

    both = tmp_path / "both"
    assert cli.main(["report", str(demo["run"]), str(cut), "--out", str(both)]) == 0
    html, md = _check_files(both)
    (row2,) = _val_rows(demo["run"] / "stage2")
    assert _table_row(md, f"demo: stage 2 final (epoch 1, step {row2['step']})") == _expected(row2)
    assert _table_row(md, f"demo-interrupted: stage 1 final (epoch 1, step {row1['step']})") == _expected(row1)
    assert "| demo: livr |" in md and "| demo-interrupted: livr |" in md
    assert "demo, demo-interrupted" in html


def test_doctor_passes_here_with_no_gpu_notes(demo, capsys):
    args = ["doctor", "--config", os.path.join(ROOT, "configs", "demo.yaml")]
    for s in demo["sets"]:
        args += ["--set", s]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"note\s+GPUs\s+no GPU visible", out)
    assert re.search(r"note\s+flex attention", out) and "FAIL" not in out
    assert re.search(r"ok\s+data.train\s+.* 8 samples", out) and re.search(r"ok\s+model.path", out)
    assert "no op build needed" in out and "no blocking problem" in out


def test_doctor_leaves_the_shard_folders_it_checks_as_they_were(demo, tmp_path, capsys, monkeypatch):
    """Shards without a manifest are counted by indexing them; doctor stores those indexes in the
    cache dir, never beside the user's shards (the loader finds them there later)."""
    import glob
    import shutil

    shards = tmp_path / "bare"
    shards.mkdir()
    for f in glob.glob(os.path.join(demo["data"], "*", "train-*.tar")):
        shutil.copy(f, shards / f"{os.path.basename(os.path.dirname(f))}-{os.path.basename(f)}")
    cache = tmp_path / "cache"
    monkeypatch.setenv("LIVR_DS_INDEX_CACHE", str(cache))
    before = {f: os.stat(shards / f).st_mtime_ns for f in os.listdir(shards)}
    args = ["doctor", "--config", os.path.join(ROOT, "configs", "demo.yaml")]
    for s in demo["sets"] + [f"data.train=[{shards}/*.tar]"]:
        args += ["--set", s]
    assert cli.main(args) == 0
    assert re.search(r"ok\s+data.train\s+.* 8 samples", capsys.readouterr().out)
    assert {f: os.stat(shards / f).st_mtime_ns for f in os.listdir(shards)} == before  # nothing added or touched
    assert len(glob.glob(str(cache / "*.idx.json"))) == len(before)


def test_doctor_fails_on_a_missing_model_and_shard_directory(demo, tmp_path, capsys):
    missing_model, missing_data = tmp_path / "no-such-model", tmp_path / "no-such-shards"
    args = ["doctor", "--config", os.path.join(ROOT, "configs", "demo.yaml")]
    for s in demo["sets"] + [f"model.path={missing_model}", f"data.train=[{missing_data}]"]:
        args += ["--set", s]
    assert cli.main(args) == 1
    out = capsys.readouterr().out
    assert re.search(rf"FAIL\s+model.path\s+{re.escape(str(missing_model))} does not exist", out)
    assert re.search(rf"FAIL\s+data.train\s+.*{re.escape(str(missing_data))}", out)
    assert re.search(r"ok\s+data.val", out)  # the rest is still checked
    assert "2 problem(s) would stop a run" in out
