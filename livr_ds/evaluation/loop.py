"""The evaluation loop: greedy answers on a split under one of four modes, exactly once across
ranks. One loop for `launch/eval.py` / `livr-ds eval` (livr_ds/evaluation/cli.py: arguments, results
files, provenance) and for training's validation (`evaluate` + `gather_accuracy`).

Modes: livr_ds/inference.py (the paper's test-time variants, each an input and a mask).

Exactly once: the loader gives every rank the same number of batches, padding the last global
batch with repeated samples marked `is_pad`; those are dropped before generation. The global
position of every sample is a function of (rank, batch, slot), so `--max-samples` takes the
same subset at any world size (a fixed seeded shuffle first, so that the subset mixes the tasks)
and the gathered records are sorted into that order.

Device: the accelerator when there is one (cuda:LOCAL_RANK), else the CPU; `--device` overrides.
dtype `auto`: bfloat16 on a CUDA device with bf16 support, else float32. One process never
initialises torch.distributed; several (WORLD_SIZE > 1) do, and split the samples.

"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os

import torch

from . import generate
from .scoring import accuracy_by_task, score
from ..inference import DEFAULT_MAX_NEW_TOKENS, EvalMode, get_mode
from ..modeling import merged_latent_rows
from ..data.collate import LivrCollator, SampleRefused
from ..data.schema import DataError
from ..data.loader import LivrLoader
from ..data.sources import ShardSource

log = logging.getLogger(__name__)

# The per-sample token limit when nothing says otherwise (zero-shot): what training configs accept.
DEFAULT_MAX_TOKENS = 8192


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
    from ..export import load_base, load_export

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
                 max_samples: int = 0, num_workers: int = 0, seed: int = 0, on_error: str = "raise",
                 lockstep: bool = False):
    """Yield (global positions, samples) per batch for this rank, padded duplicates removed.

    Order is the dataset order, or with max_samples a fixed shuffle (`seed`, epoch 0) so that the
    first N mix every task instead of being the first task's; either way a pure function of the
    sources, and position p of global batch b, rank r, slot i is b * W * B + r * B + i: the same
    sample at any world size.

    lockstep (ZeRO-3): every rank gets the same number of full batches, each sample that is not
    to be counted (padding, beyond max_samples) kept with position None, so that every rank runs
    the same forwards.
    """
    loader = LivrLoader(as_sources(data, split), rank=rank, world_size=world_size, batch_size=batch_size,
                        num_workers=num_workers, seed=seed, shuffle=bool(max_samples), on_error=on_error)
    batches = len(loader)
    if max_samples:
        batches = min(batches, -(-max_samples // (world_size * batch_size)))
    for b, samples in enumerate(loader):
        if b >= batches:
            break
        base = b * world_size * batch_size + rank * batch_size
        counted = [not s.is_pad and (not max_samples or base + i < max_samples) for i, s in enumerate(samples)]
        if lockstep:
            yield [base + i if c else None for i, c in enumerate(counted)], list(samples)
        elif any(counted):
            yield [base + i for i, c in enumerate(counted) if c], [s for s, c in zip(samples, counted) if c]


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
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_samples: int = 0, max_tokens: int | None = None,
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

    Training's validation (every rank, the model inside the DeepSpeed engine; under ZeRO-3 the
    model's `lockstep` makes every rank run the same forwards, each of which gathers parameters):

        records, _ = evaluate(trainer.backbone, cfg.data.val, "standard",
                              split=cfg.data.val_split, batch_size=max(cfg.optim.micro_batch_size, 4),
                              max_samples=cfg.data.val_max_samples, max_tokens=cfg.data.max_tokens,
                              num_workers=cfg.data.num_workers, seed=cfg.seed, on_error=cfg.data.on_error)
        acc = gather_accuracy(records)            # collective: dist.gather_objects on every rank
        acc["mean"], acc["per_task"]               # scoring.accuracy_by_task over all ranks' records
    """
    from . import probes
    if max_samples < 0:
        raise ValueError(f"max_samples {max_samples}: must be >= 0 (0 = the whole split)")
    from ..data.loader import dist_rank_world

    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
    if rank is None or world_size is None:
        r, w = dist_rank_world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    mode = get_mode(mode) if isinstance(mode, str) else mode
    model = generate.unwrap(backbone.model)
    if model.lockstep and (scoring != "generate" or probe):
        raise ValueError("evaluation of a ZeRO-3 model in training runs generation only (no likelihood scoring, "
                         "no probes): evaluate the export with livr-ds eval instead")
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

    def evaluate_batch(positions, samples) -> list[dict]:
        nonlocal drawn
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
        recs = score(samples, preds)
        for r, sc in zip(recs, option_ll):
            if sc is not None:
                r["option_loglik"] = sc
        for p, r in zip(positions, recs):
            r["index"] = p
        if model.lockstep:  # padding and samples past max_samples ran only to keep ranks in step
            recs = [r for r in recs if r["index"] is not None]
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
        return recs

    last = None  # the last sample evaluated: a stand-in under lockstep
    try:
        for positions, samples in iter_samples(data, split, rank, world_size, batch_size, max_samples, num_workers,
                                               seed=seed, on_error=on_error, lockstep=model.lockstep):
            positions, samples = list(positions), list(samples)
            for _ in range(2 * len(samples) + 2):
                try:
                    recs = evaluate_batch(positions, samples) if samples else []
                    break
                except SampleRefused as exc:
                    # The processor refused a sample (shards written without livr-ds's shape
                    # checks): the same rule as a sample that does not decode.
                    k = _refused_slot(samples, exc)
                    if on_error == "raise" or k is None:
                        raise DataError(str(exc)) from None
                    log.warning("skipping bad sample: %s", exc)
                    if not model.lockstep:
                        del positions[k], samples[k]
                    else:  # every rank must run the same forwards: a stand-in, not counted
                        donor = samples[0] if k > 0 else last
                        if donor is None:
                            raise DataError(f"{exc}; under lockstep (ZeRO-3) there is no sample to stand in "
                                            "for it: remove it from the shards") from None
                        positions[k], samples[k] = None, donor
            else:
                raise DataError("the processor refused every stand-in for the bad samples of a batch")
            if samples:
                last = samples[-1]
            records += recs
    finally:
        rows.close()
        model.train(was_training)
    return records, (acc.state() if acc else None)


def _refused_slot(samples: list, exc: SampleRefused) -> int | None:
    """Where the sample the processor refused sits in the batch (likelihood scoring encodes copies
    of it, one per option: those are found by shard and key)."""
    if exc.sample is None:
        return None
    for i, s in enumerate(samples):
        if s is exc.sample:
            return i
    return next((i for i, s in enumerate(samples) if (s.shard, s.key) == (exc.sample.shard, exc.sample.key)), None)


def gather_records(records: list[dict], extra=None) -> tuple[list[dict], list]:
    """Every rank's records in global order (and every rank's `extra`, in rank order). A collective
    when torch.distributed is initialised (call it on every rank); the identity otherwise."""
    from .. import distributed as dist

    gathered = dist.gather_objects((records, extra))
    out = sorted((r for part, _ in gathered for r in part), key=lambda r: r["index"])
    if len({r["index"] for r in out}) != len(out):
        raise RuntimeError("internal: a sample was evaluated twice across ranks")
    return out, [e for _, e in gathered]


def gather_accuracy(records: list[dict]) -> dict:
    """scoring.accuracy_by_task over all ranks' records ({"per_task", "mean"}); collective."""
    return accuracy_by_task(gather_records(records)[0])
