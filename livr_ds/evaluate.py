"""Evaluation: greedy answers on a test split under one of four modes, exactly once across ranks.

    python launch/eval.py --ckpt RUN/stage2 --data shards/ --mode standard --out results/livr.json
    torchrun --nproc_per_node 2 launch/eval.py ...          (same results, gathered on rank 0)

Modes (the paper's evaluation variants, Section 5):

| mode                    | input                         | mask       |
|-------------------------|-------------------------------|------------|
| standard                | [prompt][K latents] -> answer | standard   |
| no_latents              | [prompt] -> answer            | standard   |
| bottleneck              | [prompt][K latents] -> answer | bottleneck |
| bottleneck_no_latents   | [prompt] -> answer            | bottleneck |

"bottleneck" is the Stage 1 mask at test time: prompt and answer tokens cannot see the image, so
the answer can only use what the latents carry. Latents are input, never generated.

Exactly once: the loader gives every rank the same number of batches, padding the last global
batch with repeated samples marked `is_pad`; those are dropped before generation. The global
position of every sample is a function of (rank, batch, slot), so `--max-samples` takes the
same subset at any world size (a fixed seeded shuffle first, so that the subset mixes the tasks)
and the gathered records are sorted into that order.

Device: the accelerator when there is one (cuda:LOCAL_RANK), else the CPU; `--device` overrides.
dtype `auto`: bfloat16 on a CUDA device with bf16 support, else float32. One process never
initialises torch.distributed; several (WORLD_SIZE > 1) do, and split the samples.

Training's validation calls the same loop (`evaluate` + `gather_accuracy`, see `evaluate`).

Outputs: `results.json` ({"mode", "per_task": {task: {"accuracy", "n"}}, "mean", ...} plus
provenance: checkpoint, data paths with the manifest's sha256, split, pixel budget, parse
failures, versions) and the raw predictions in `results.predictions.jsonl` beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass

import torch

from . import generate
from .modeling import merged_latent_rows
from .data.collate import LivrCollator
from .data.reader import LivrLoader, ShardSource

log = logging.getLogger(__name__)

# The per-sample token limit when nothing says otherwise (zero-shot): what training configs accept.
DEFAULT_MAX_TOKENS = 8192


@dataclass(frozen=True)
class EvalMode:
    name: str
    policy: str  # the mask policy at test time
    keep_latents: bool  # False: the K latent tokens are removed from the input


MODES = {m.name: m for m in (
    EvalMode("standard", "standard", True),
    EvalMode("no_latents", "standard", False),
    EvalMode("bottleneck", "bottleneck", True),
    EvalMode("bottleneck_no_latents", "bottleneck", False),
)}


def get_mode(name: str) -> EvalMode:
    if name not in MODES:
        raise ValueError(f"unknown eval mode {name!r}; choose one of {', '.join(MODES)}")
    return MODES[name]


def make_collator(backbone, mode: EvalMode, *, with_answer: bool, max_tokens: int | None = None) -> LivrCollator:
    """The collator a mode feeds the model: with the checkpoint's latents, or with none."""
    latent_ids = backbone.latent_ids if mode.keep_latents else []
    return LivrCollator(backbone.adapter, backbone.processor, latent_ids,
                        max_tokens=max_tokens or default_max_tokens(backbone), too_long="error",
                        with_answer=with_answer)


def default_max_tokens(backbone) -> int:
    """The export's own limit (livr.json `max_tokens`, what training accepted), else 8192."""
    path = os.path.join(str(backbone.path), "livr.json")
    if os.path.isfile(path):
        with open(path) as f:
            value = json.load(f).get("max_tokens")
        if value:
            return int(value)
    return DEFAULT_MAX_TOKENS


def resolve_device(name: str = "auto") -> torch.device:
    """auto: cuda:LOCAL_RANK when CUDA is available, else cpu; cpu / cuda as named."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    if name != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on a CUDA device that supports it, float32 otherwise."""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"unknown dtype {name!r}; choose auto, float32 or bfloat16")
    return torch.bfloat16 if name == "bfloat16" else torch.float32


# ---- loading ------------------------------------------------------------------------------
def load_model(ckpt: str | None = None, *, which: str = "final", base_model: str | None = None,
               family: str | None = None, attn_backend: str = "sdpa", device="cpu",
               dtype: torch.dtype = torch.float32):
    """A trained export (ckpt) or, with only base_model + family, a base model for zero-shot."""
    from .export import load_base, load_export

    if ckpt:
        return load_export(ckpt, which=which, device=device, dtype=dtype, attn_backend=attn_backend,
                           base_model=base_model)
    if not (base_model and family):
        raise ValueError("give --ckpt (an export or a stage run dir), or --base-model and --family for zero-shot")
    return load_base(family, base_model, device=device, dtype=dtype, attn_backend=attn_backend)


# ---- the loop -----------------------------------------------------------------------------
def as_sources(data, split: str | None = None) -> list[ShardSource]:
    """ShardSources from paths, ShardSource objects or anything with .path (and .weight), e.g. the
    config's DataSource. `split` applies to all; None: "test" for paths, a ShardSource keeps its own."""
    if isinstance(data, (str, os.PathLike, ShardSource)):
        data = [data]
    out = []
    for d in data:
        if isinstance(d, ShardSource):
            out.append(dataclasses.replace(d, split=split) if split else d)
        elif isinstance(d, (str, os.PathLike)):
            out.append(ShardSource(os.fspath(d), split=split or "test"))
        else:
            out.append(ShardSource(d.path, weight=getattr(d, "weight", 1.0), split=split or "test"))
    return out


def iter_samples(data, split: str | None, rank: int, world_size: int, batch_size: int,
                 max_samples: int = 0, num_workers: int = 0, seed: int = 0, on_error: str = "raise"):
    """Yield (global positions, samples) per batch for this rank, padded duplicates removed.

    Order is the dataset order, or with max_samples a fixed shuffle (`seed`, epoch 0) so that the
    first N mix every task instead of being the first task's; either way a pure function of the
    sources, and position p of global batch b, rank r, slot i is b * W * B + r * B + i: the same
    sample at any world size.
    """
    loader = LivrLoader(as_sources(data, split), rank=rank, world_size=world_size, batch_size=batch_size,
                        num_workers=num_workers, seed=seed, shuffle=bool(max_samples), on_error=on_error)
    for b, samples in enumerate(loader):
        base = b * world_size * batch_size + rank * batch_size
        keep = [(base + i, s) for i, s in enumerate(samples)
                if not s.is_pad and (not max_samples or base + i < max_samples)]
        if keep:
            yield [p for p, _ in keep], [s for _, s in keep]


@torch.no_grad()
def likelihood_answers(model, collator: LivrCollator, samples, policy: str) -> list[tuple[str, list[float]]]:
    """Forced choice for multiple-choice samples: the option whose gold-format answer ("(X)" <eos>)
    has the highest log-likelihood (summed over its tokens) under `policy`. Always a valid option,
    so no parse failures: what a model knows when its free-form answer is unreadable.
    `collator` must be built with with_answer=True. Returns (prediction, per-option log-likelihood)."""
    rows, owners = [], []
    for i, s in enumerate(samples):
        for j in range(len(s.choices)):
            rows.append(collator.encode(dataclasses.replace(s, answer=chr(65 + j))))
            owners.append(i)
    if not rows:
        return [("", []) for _ in samples]
    model = generate.unwrap(model)
    device = next(model.parameters()).device
    batch = generate.to_device(collator.pad(rows), device)
    hidden = model.hidden_states(batch, policy)[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logp = torch.log_softmax(model.hf_model.lm_head(hidden[keep]).float(), dim=-1)
    token_ll = logp.gather(-1, targets[keep][:, None])[:, 0]
    row_of = keep.nonzero()[:, 0]
    ll = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row_of, token_ll.double())
    scores: list[list[float]] = [[] for _ in samples]
    for i, v in zip(owners, ll.tolist()):
        scores[i].append(v)
    return [(f"({chr(65 + max(range(len(sc)), key=sc.__getitem__))})" if sc else "", sc) for sc in scores]


SCORINGS = ("generate", "likelihood")


def evaluate(backbone, data, mode: str | EvalMode, *, split: str | None = None, batch_size: int = 8,
             max_new_tokens: int = 8, max_samples: int = 0, max_tokens: int | None = None,
             rank: int | None = None, world_size: int | None = None, probe: str | None = None,
             probe_images: int = 0, probe_dir: str | None = None, num_workers: int = 0,
             scoring: str = "generate", seed: int = 0, on_error: str = "raise",
             use_cache: bool = True) -> tuple[list[dict], dict | None]:
    """This rank's records (one per real sample, in global order) and its probe accumulators.

    The one evaluation loop: `launch/eval.py` / `livr-ds eval` and training's validation both call
    it. `backbone` needs .model (a LivrModel, or the DeepSpeed engine around one: engine.module
    is used), .processor, .adapter, .latent_ids and .path (for the default max_tokens). `data`:
    paths, ShardSource objects or config DataSources (weights kept); `split` applies to all of
    them (None: "test" for paths, a ShardSource's own split). rank / world_size None: from
    torch.distributed when it is initialised, else 0 / 1. max_tokens None: the export's livr.json
    `max_tokens`, else 8192. The model is put in eval mode and given back in the mode it was in.

    scoring="generate": greedy answers (KV-cached, generate.greedy_answers), parsed (the paper's
    protocol). "likelihood": forced choice among the options for multiple-choice samples
    (open-ended ones are still generated).

    Training's validation (every rank, the model inside the DeepSpeed engine; ZeRO 1/2 only: the
    ranks may run different numbers of forwards, which ZeRO-3's gathered parameters would not allow):

        records, _ = evaluate.evaluate(trainer.backbone, cfg.data.val, "standard",
                                       split=cfg.data.val_split, batch_size=max(cfg.optim.micro_batch_size, 4),
                                       max_samples=cfg.data.val_max_samples, max_tokens=cfg.data.max_tokens,
                                       num_workers=cfg.data.num_workers, seed=cfg.seed,
                                       on_error=cfg.data.on_error)
        acc = evaluate.gather_accuracy(records)   # collective: dist.gather_objects on every rank
        acc["mean"], acc["per_task"]               # generate.accuracy_by_task over all ranks' records
    """
    from . import probes
    from .data.reader import dist_rank_world

    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
    if rank is None or world_size is None:
        r, w = dist_rank_world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    mode = get_mode(mode) if isinstance(mode, str) else mode
    model = generate.unwrap(backbone.model)
    max_tokens = max_tokens or default_max_tokens(backbone)
    gen_collator = make_collator(backbone, mode, with_answer=False, max_tokens=max_tokens)
    answer_collator = make_collator(backbone, mode, with_answer=True, max_tokens=max_tokens)
    acc = probes.AttentionAccumulator() if probe else None
    drawn = 0
    records: list[dict] = []
    was_training = model.training
    model.eval()
    rows = contextlib.ExitStack()  # the trained latent rows written into the table for the loop
    rows.enter_context(merged_latent_rows(model.hf_model))
    try:
        for positions, samples in iter_samples(data, split, rank, world_size, batch_size, max_samples, num_workers,
                                               seed=seed, on_error=on_error):
            preds: list[str | None] = [None] * len(samples)
            option_ll: list[list[float] | None] = [None] * len(samples)
            if scoring == "likelihood":
                mc = [i for i, s in enumerate(samples) if s.choices]
                for i, (pred, sc) in zip(mc, likelihood_answers(model, answer_collator, [samples[i] for i in mc],
                                                                mode.policy)):
                    preds[i], option_ll[i] = pred, sc
            rest = [i for i, p in enumerate(preds) if p is None]
            if rest:
                for i, pred in zip(rest, generate.greedy_answers(model, gen_collator, [samples[i] for i in rest],
                                                                 mode.policy, max_new_tokens, use_cache=use_cache)):
                    preds[i] = pred
            recs = generate.score(samples, preds)
            for r, sc in zip(recs, option_ll):
                if sc is not None:
                    r["option_loglik"] = sc
            for p, r in zip(positions, recs):
                r["index"] = p
            if probe:
                batch = answer_collator(samples)
                per_sample, maps = probes.attention_probe(model, batch, mode.policy, want_maps=drawn < probe_images)
                acc.add(per_sample, [s.task for s in samples])
                for r, v in zip(recs, per_sample):
                    r["answer_to_latent"] = v["answer_to_latent"]
                if maps is not None and probe_dir:
                    for s, m in zip(samples, maps):
                        if drawn >= probe_images:
                            break
                        probes.draw_latent_heatmaps(s, m, os.path.join(probe_dir, f"{s.key.replace('/', '_')}.png"),
                                                    title=f"{s.task} {s.key}: latent-to-image attention ({mode.name})")
                        drawn += 1
            records += recs
    finally:
        rows.close()
        model.train(was_training)
    return records, (acc.state() if acc else None)


def gather_records(records: list[dict], extra=None) -> tuple[list[dict], list]:
    """Every rank's records in global order (and every rank's `extra`, in rank order). A collective
    when torch.distributed is initialised (call it on every rank); the identity otherwise."""
    from .train import distributed as dist

    gathered = dist.gather_objects((records, extra))
    out = sorted((r for part, _ in gathered for r in part), key=lambda r: r["index"])
    if len({r["index"] for r in out}) != len(out):
        raise RuntimeError("internal: a sample was evaluated twice across ranks")
    return out, [e for _, e in gathered]


def gather_accuracy(records: list[dict]) -> dict:
    """generate.accuracy_by_task over all ranks' records ({"per_task", "mean"}); collective."""
    return generate.accuracy_by_task(gather_records(records)[0])


def parse_failures(records: list[dict]) -> dict:
    """Predictions that named no valid option / no number, overall and per task."""
    per_task: dict[str, int] = {}
    for r in records:
        per_task.setdefault(r["task"], 0)
        if r["parsed"] is None:
            per_task[r["task"]] += 1
    return {"total": sum(per_task.values()), "per_task": per_task}


# ---- provenance ---------------------------------------------------------------------------
def _sha256(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def data_provenance(data: list[str], split: str) -> list[dict]:
    """Per data source: path, split, manifest sha256 (the data revision) and what it says of itself."""
    out = []
    for d in data:
        manifest = os.path.join(d, "manifest.json") if os.path.isdir(d) else d
        entry = {"path": os.path.abspath(d), "split": split, "manifest": os.path.abspath(manifest),
                 "manifest_sha256": _sha256(manifest)}
        if entry["manifest_sha256"]:
            with open(manifest) as f:
                m = json.load(f)
            info = m.get("splits", {}).get(split, {})
            entry["samples"] = info.get("total")
            entry["tasks"] = info.get("tasks")
            for key in ("revision", "source", "demo", "format"):
                if key in m:
                    entry[key] = m[key]
        out.append(entry)
    return out


def pixel_budget(processor) -> dict:
    """min/max pixels the image processor resizes to, and its raw size settings.

    Qwen-VL image processors keep min/max pixels as size.shortest_edge / size.longest_edge (in
    pixels, not edges); other processors record their own size fields."""
    ip = getattr(processor, "image_processor", None)
    size = getattr(ip, "size", None)
    if size is not None and not isinstance(size, dict):
        size = {k: v for k, v in vars(size).items() if v is not None}
    size = size or {}
    lo = getattr(ip, "min_pixels", None) or size.get("min_pixels")
    hi = getattr(ip, "max_pixels", None) or size.get("max_pixels")
    if lo is None and hi is None and type(ip).__name__.startswith("Qwen"):
        lo, hi = size.get("shortest_edge"), size.get("longest_edge")
    return {"min_pixels": lo, "max_pixels": hi, "image_processor": type(ip).__name__ if ip else None,
            "size": size or None}


def _git_state() -> dict:
    """The livr-ds commit and whether tracked files differ from it (best effort: may not be a checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        git = (lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, timeout=10,
                                         check=False))
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return {"livr_ds_commit": None}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"livr_ds_commit": head.stdout.strip(), "livr_ds_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"livr_ds_commit": None}


def checkpoint_provenance(backbone, ckpt: str | None, which: str, base_model: str | None) -> dict:
    from .train.checkpoint import read_livr_metadata

    if not ckpt:
        return {"ckpt": None, "zero_shot": True, "base_model": os.path.abspath(base_model or backbone.path)}
    meta = read_livr_metadata(backbone.path)
    keep = ("family", "base_model", "stage", "policy", "latents", "epoch", "global_step", "val_accuracy",
            "merged", "min_pixels", "max_pixels", "max_tokens")
    return {"ckpt": os.path.abspath(ckpt), "which": which, "export": os.path.abspath(backbone.path),
            "zero_shot": False, "livr": {k: meta[k] for k in keep if k in meta}}


def summarize(records: list[dict], mode: EvalMode, *, name: str | None = None, provenance: dict | None = None,
              probe: dict | None = None, scoring: str = "generate") -> dict:
    acc = generate.accuracy_by_task(records)
    out = {"name": name, "mode": mode.name, "policy": mode.policy, "latents_kept": mode.keep_latents,
           "scoring": scoring,
           "per_task": acc["per_task"], "mean": acc["mean"], "n": len(records),
           "parse_failures": parse_failures(records)}
    if probe is not None:
        out["probe"] = probe
    out["provenance"] = provenance or {}
    return out


def predictions_path(out: str) -> str:
    return f"{out.removesuffix('.json')}.predictions.jsonl"


def write_results(results: dict, records: list[dict], out: str) -> tuple[str, str]:
    """results.json + the raw predictions (one JSON object per sample) beside it, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    preds = predictions_path(out)
    results = {**results, "predictions": os.path.basename(preds)}
    for path, text in ((preds, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)),
                       (out, json.dumps(results, indent=1) + "\n")):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return out, preds


# ---- the entry point (launch/eval.py, `livr-ds eval`) -----------------------------------------
def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", help="an export dir (with livr.json) or a stage run dir (uses export/<which>)")
    p.add_argument("--which", default="final", choices=["final", "best"], help="export of a run dir")
    p.add_argument("--base-model", help="zero-shot: a local base checkpoint (no --ckpt); with --ckpt: "
                                        "load the adapter onto this base instead of livr.json's")
    p.add_argument("--family", choices=["qwen2_5_vl", "qwen3_vl", "llava_onevision"], help="zero-shot: model family")
    p.add_argument("--data", nargs="+", required=True, help="shard directories (each with manifest.json)")
    p.add_argument("--split", default="test")
    p.add_argument("--mode", default="standard", choices=list(MODES))
    p.add_argument("--out", required=True, help="results JSON; predictions go to <stem>.predictions.jsonl")
    p.add_argument("--name", help="run name for `livr-ds table` (default: the file stem)")
    p.add_argument("--scoring", default="generate", choices=SCORINGS,
                   help="generate: greedy answers, parsed (default, the paper's protocol); likelihood: forced "
                        "choice, the option whose answer has the highest log-likelihood (multiple choice only)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per rank per generation batch")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--max-samples", type=int, default=0, help="a fixed mixed subset: the first N of a seeded shuffle of the split, the same at any world size (0 = all)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="refuse longer samples (answers are never cut); default: the export's max_tokens from "
                        f"training (livr.json), {DEFAULT_MAX_TOKENS} zero-shot")
    p.add_argument("--attn-backend", default="sdpa", choices=["sdpa", "eager"],
                   help="sdpa; eager is forced by --probe attention (attention weights need it)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: cuda:LOCAL_RANK when a GPU is visible, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 on a CUDA device with bf16 support, else float32")
    p.add_argument("--probe", choices=["attention"], help="also measure answer->latent attention and draw "
                                                           "latent->image heat maps")
    p.add_argument("--probe-images", type=int, default=4, help="heat-map PNGs to draw (rank 0's first samples)")
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers per rank")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _distributed_env() -> bool:
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) > 1


def run(args: argparse.Namespace) -> dict:
    """Evaluate as the arguments say; rank 0 writes the files. Returns the results on every rank."""
    from . import probes
    from .train import distributed as dist

    if args.mode not in MODES:
        raise ValueError(f"unknown eval mode {args.mode!r}; choose one of {', '.join(MODES)}")
    if args.ckpt is None and not (args.base_model and args.family):
        raise ValueError("give --ckpt (an export or a stage run dir), or --base-model and --family for zero-shot")
    started = time.time()
    requested = getattr(args, "device", "auto")
    if _distributed_env():  # several ranks: a process group (nccl on GPUs, gloo on CPUs)
        device = dist.init(None if requested == "auto" else requested)
    else:  # one process: no torch.distributed at all
        device = resolve_device(requested)
        if device.type == "cuda":
            torch.cuda.set_device(device)
    backend = "eager" if args.probe == "attention" else args.attn_backend
    dtype = resolve_dtype(args.dtype, device)
    backbone = load_model(args.ckpt, which=args.which, base_model=args.base_model, family=args.family,
                          attn_backend=backend, device=device, dtype=dtype)
    max_tokens = args.max_tokens or default_max_tokens(backbone)
    mode = get_mode(args.mode)
    probe_dir = f"{args.out.removesuffix('.json')}.probes" if args.probe else None
    if probe_dir and dist.is_main():
        os.makedirs(probe_dir, exist_ok=True)
    records, probe_state = evaluate(
        backbone, args.data, mode, split=args.split, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        max_samples=args.max_samples, max_tokens=max_tokens, rank=dist.rank(), world_size=dist.world_size(),
        probe=args.probe, probe_images=args.probe_images if dist.is_main() else 0, probe_dir=probe_dir,
        num_workers=args.num_workers, scoring=args.scoring,
    )
    records, probe_states = gather_records(records, probe_state)
    probe = probes.AttentionAccumulator.merge(probe_states).summary(len(backbone.latent_ids)
                                                                            if mode.keep_latents else 0) \
        if args.probe else None
    if probe is not None:
        probe["heatmaps"] = os.path.abspath(probe_dir)
        probe["backend"] = backend
    import transformers

    provenance = {
        **checkpoint_provenance(backbone, args.ckpt, args.which, args.base_model),
        "family": backbone.adapter.family,
        "num_latents": len(backbone.latent_ids),
        "latents_fed": len(backbone.latent_ids) if mode.keep_latents else 0,
        "data": data_provenance(args.data, args.split),
        "max_samples": args.max_samples,
        "pixels": pixel_budget(backbone.processor),
        "generation": {"scoring": args.scoring, "greedy": True, "kv_cache": True,
                       "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size},
        "max_tokens": max_tokens,
        "attn_backend": backend, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
        "world_size": dist.world_size(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, **_git_state()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.time() - started, 2),
    }
    results = summarize(records, mode, name=args.name, provenance=provenance, probe=probe, scoring=args.scoring)
    if dist.is_main():
        out, preds = write_results(results, records, args.out)
        fails = results["parse_failures"]["total"]
        log.info("%s: mean %.2f over %d samples %s; %d parse failures; wrote %s and %s", mode.name, results["mean"],
                 len(records), {t: round(v["accuracy"], 2) for t, v in results["per_task"].items()}, fails, out, preds)
        if fails:
            log.warning("%d predictions named no valid answer (see 'parsed': null in %s)", fails, preds)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch/eval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"eval: error: {e}", flush=True)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0

