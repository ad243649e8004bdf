"""`livr-ds analyze latents`: what the K latents carry, measured on a checkpoint and a split.

    livr-ds analyze latents --ckpt RUN/stage1 --data shards/ --mode standard bottleneck \\
        --max-samples 200 --seed 0 --out RUN/analysis/

writes DIR/analysis.json (and DIR/sensitivity.png), which `livr-ds report` shows when DIR is
under the run directory. Per mode (one that keeps the latents: standard, bottleneck):

- accuracy: greedy answers with the latents' own states (`none`), zeroed (`zeroed`), replaced by
  the mean over the analysed samples (`mean`), or by Gaussian noise of the same norm per vector
  (`noise`); each {accuracy, k, n, ci95} with a Wilson 95% interval.
- swap: each recipient gets a donor with a different gold answer (same task and aligned latent
  positions preferred, see latent_states.py); the recipient's prompt is decoded with the donor's
  latent states: {follow_donor, follow_recipient, neither} fractions of n (summing to 1), each
  with a Wilson interval, and how many pairs had aligned positions.
- sensitivity: per layer (0 = the embeddings), latent states as the mean over the K latents of
  that layer's hidden states: the mean pairwise cosine similarity across samples, and the mean
  cosine between each sample and the same sample with Gaussian noise (std --pixel-noise, pixel
  values in [0, 1]) added to its images.
- probe: a logistic regression (torch, full batch) from the last layer's latent state to the
  gold answer, trained on a seeded split (70 / 30) of the samples: held-out accuracy with a Wilson
  interval, beside the majority-class baseline.

The intervention mechanics (read, splice, decode) are livr_ds/evaluation/latent_states.py.
One process (no torch.distributed); each sample runs on its own (batch size 1).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import random
import time

import numpy as np
import torch

from . import latent_states as ls
from ..inference import DEFAULT_MAX_NEW_TOKENS, MODES, get_mode
from .scoring import is_correct, parse_choice, parse_count

log = logging.getLogger(__name__)

ANALYSIS_MODES = tuple(name for name, m in MODES.items() if m.keep_latents)
ABLATIONS = ("none", "zeroed", "mean", "noise")
Z95 = 1.959963984540054


# ---- statistics ------------------------------------------------------------------------------
def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k / n (0 <= k <= n, n > 0)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def proportion(k: int, n: int) -> dict:
    return {"accuracy": k / n if n else None, "k": int(k), "n": int(n), "ci95": list(wilson_interval(k, n))}


def gold_key(sample) -> str:
    """The gold answer, normalised as scoring.is_correct compares it."""
    answer = str(sample.answer)
    if sample.choices:
        return parse_choice(answer, list(sample.choices)) or answer.strip("() ").upper()
    count = parse_count(answer)
    return str(count) if count is not None else answer.strip().lower()


def mean_pairwise_cosine(x: torch.Tensor) -> float | None:
    """Mean cosine similarity over all pairs of rows of x (N, H)."""
    if x.shape[0] < 2:
        return None
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    g = xn @ xn.T
    n = x.shape[0]
    return float((g.sum() - g.diagonal().sum()) / (n * (n - 1)))


def linear_probe(features: torch.Tensor, labels: list[str], seed: int, test_fraction: float = 0.3,
                 steps: int = 300, weight_decay: float = 1e-3) -> dict:
    """Held-out accuracy of a multinomial logistic regression from features (N, H) to labels."""
    classes = sorted(set(labels))
    n = len(labels)
    n_test = max(1, round(test_fraction * n))
    if len(classes) < 2 or n - n_test < 2:
        return {"accuracy": None, "reason": f"{n} samples, {len(classes)} classes: too few to fit a probe",
                "n_train": max(0, n - n_test), "n_test": n_test, "classes": len(classes)}
    order = np.random.default_rng(seed).permutation(n)
    test, train = order[:n_test], order[n_test:]
    y = torch.tensor([classes.index(lab) for lab in labels])
    x = features.double()
    mu, sd = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    x = (x - mu) / sd
    w = torch.zeros(x.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    xt, yt = x[train], y[train]
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + weight_decay * (w * w).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = (x[test] @ w + b).argmax(-1)
    k = int((pred == y[test]).sum())
    majority = max(classes, key=lambda c: sum(labels[i] == c for i in train))
    base = sum(labels[i] == majority for i in test)
    return {**proportion(k, n_test), "n_train": len(train), "n_test": n_test, "classes": len(classes),
            "majority_baseline": base / n_test, "features": "last layer, mean over the K latents"}


# ---- inputs --------------------------------------------------------------------------------
def perturb_images(sample, std: float, rng: np.random.Generator):
    """A copy of the sample with Gaussian noise (std in [0, 1] pixel units) added to each image."""
    import dataclasses

    from PIL import Image

    images = []
    for img in sample.images:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        arr = np.clip(arr + rng.normal(0.0, std, arr.shape), 0.0, 1.0)
        images.append(Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8)))
    return dataclasses.replace(sample, images=images)


def choose_donors(samples, pres, seed: int) -> list[tuple[int, bool] | None]:
    """(donor index, positions aligned) per recipient: a sample with a different gold answer,
    preferring aligned latent positions, then the same task; None when every gold answer is the same."""
    rng = random.Random(seed)
    keys = [gold_key(s) for s in samples]
    out = []
    for i, s in enumerate(samples):
        cands = [j for j in range(len(samples)) if keys[j] != keys[i]]
        if not cands:
            out.append(None)
            continue
        rank = {j: 2 * ls.positions_aligned(pres[i], pres[j]) + (samples[j].task == s.task) for j in cands}
        top = max(rank.values())
        j = rng.choice([c for c in cands if rank[c] == top])
        out.append((j, ls.positions_aligned(pres[i], pres[j])))
    return out


# ---- one mode --------------------------------------------------------------------------------
def analyze_mode(backbone, samples, mode_name: str, *, seed: int = 0, max_new_tokens: int = 8,
                 pixel_noise: float = 0.03, max_tokens: int | None = None) -> dict:
    from .loop import make_collator

    mode = get_mode(mode_name)
    if not mode.keep_latents:
        raise ValueError(f"mode {mode_name!r} removes the latents; choose one of {', '.join(ANALYSIS_MODES)}")
    model = ls.generate.unwrap(backbone.model)
    collator = make_collator(backbone, mode, with_answer=False, max_tokens=max_tokens)
    policy = mode.policy
    rng = np.random.default_rng(seed)

    # Pass 1: every sample's latent states, per-layer states, and those of a perturbed copy.
    pres, layer_means, perturbed_cos = [], [], []
    for s in samples:
        pre = ls.prefill(model, collator, s, policy)
        pre.cache = None  # re-made in pass 2: one sample's cache in memory at a time
        pre.states = pre.states.to("cpu")
        means = torch.stack([h.mean(0).cpu() for h in pre.hidden])  # (layers + 1, hidden)
        pre.hidden = []
        noisy = ls.prefill(model, collator, perturb_images(s, pixel_noise, rng), policy)
        noisy_means = torch.stack([h.mean(0).cpu() for h in noisy.hidden])
        del noisy
        perturbed_cos.append(torch.nn.functional.cosine_similarity(means.double(), noisy_means.double(), dim=-1))
        pres.append(pre)
        layer_means.append(means)
    stacked = torch.stack(layer_means)  # (N, layers + 1, hidden)
    n_layers = stacked.shape[1]
    sensitivity = {
        "layers": list(range(n_layers)), "layer_0": "the embeddings (before the first decoder layer)",
        "cross_sample_cosine": [mean_pairwise_cosine(stacked[:, layer]) for layer in range(n_layers)],
        "perturbed_cosine": [float(x) for x in torch.stack(perturbed_cos).mean(0)] if perturbed_cos else [],
        "pixel_noise_std": pixel_noise,
    }
    mean = ls.mean_states([p.states for p in pres])
    donors = choose_donors(samples, pres, seed)
    gen = torch.Generator().manual_seed(seed)

    # Pass 2: decode every intervention against the recipient's re-made cache.
    correct = {a: 0 for a in ABLATIONS}
    swap = {"follow_donor": 0, "follow_recipient": 0, "neither": 0}
    aligned = offsets = 0
    predictions = []
    device = next(model.parameters()).device
    for i, s in enumerate(samples):
        pre = ls.prefill(model, collator, s, policy)
        own = pre.states
        replacements = {"none": own, "zeroed": ls.zeroed(own), "mean": mean.to(device, own.out.dtype),
                        "noise": ls.matched_noise(own, gen)}
        row = {"key": s.key, "task": s.task, "answer": str(s.answer)}
        for name, states in replacements.items():
            ids, _ = ls.decode(model, collator, pre, policy, states, max_new_tokens)
            pred = ls.answer_text(collator, ids)
            correct[name] += is_correct(pred, str(s.answer), list(s.choices))[0]
            row[name] = pred
        if donors[i] is not None:
            j, is_aligned = donors[i]
            donor = samples[j]
            ids, _ = ls.decode(model, collator, pre, policy, pres[j].states.to(device), max_new_tokens)
            pred = ls.answer_text(collator, ids)
            if is_correct(pred, str(donor.answer), list(donor.choices))[0]:
                swap["follow_donor"] += 1
            elif is_correct(pred, str(s.answer), list(s.choices))[0]:
                swap["follow_recipient"] += 1
            else:
                swap["neither"] += 1
            aligned += is_aligned
            offsets += abs(int(pre.next_pos.flatten()[0]) - int(pres[j].next_pos.flatten()[0]))
            row.update(swap_donor=donor.key, swap_donor_answer=str(donor.answer), swap=pred)
        predictions.append(row)
        del pre
    n_swap = sum(swap.values())
    swap_out = {k: (v / n_swap if n_swap else None) for k, v in swap.items()}
    swap_out.update(n=n_swap, ci95={k: list(wilson_interval(v, n_swap)) for k, v in swap.items()},
                    aligned=aligned, mean_abs_position_offset=offsets / n_swap if n_swap else None)
    probe = linear_probe(stacked[:, -1], [gold_key(s) for s in samples], seed)
    return {"policy": policy, "n": len(samples),
            "accuracy": {a: proportion(correct[a], len(samples)) for a in ABLATIONS},
            "swap": swap_out, "sensitivity": sensitivity, "probe": probe, "predictions": predictions}


# ---- the command -----------------------------------------------------------------------------
def analyze(backbone, data, modes, *, split: str = "test", max_samples: int = 64, seed: int = 0,
            max_new_tokens: int = 8, pixel_noise: float = 0.03) -> dict:
    from .loop import iter_samples

    samples = [s for _, batch in iter_samples(data, split, 0, 1, 8, max_samples, seed=seed) for s in batch]
    if not samples:
        raise ValueError(f"no samples in split {split!r} of {data}")
    model = ls.generate.unwrap(backbone.model)
    was_training = model.training
    model.eval()
    try:
        per_mode = {m: analyze_mode(backbone, samples, m, seed=seed, max_new_tokens=max_new_tokens,
                                    pixel_noise=pixel_noise) for m in modes}
    finally:
        model.train(was_training)
    return {"kind": "latent_analysis", "n": len(samples), "num_latents": len(backbone.latent_ids),
            "family": backbone.adapter.family, "modes": per_mode}


def plot_sensitivity(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.0))
    for name, m in result["modes"].items():
        sens = m["sensitivity"]
        ax.plot(sens["layers"], [np.nan if v is None else v for v in sens["cross_sample_cosine"]], marker="o",
                label=f"{name}: across samples")
        ax.plot(sens["layers"], sens["perturbed_cosine"], marker="x", linestyle="--", label=f"{name}: perturbed image")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("cosine of latent states")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args) -> dict:
    from .loop import load_model, resolve_device, resolve_dtype
    from .provenance import checkpoint_provenance, data_provenance

    if args.max_samples < 2:
        raise ValueError(f"--max-samples {args.max_samples}: must be >= 2 (swaps need a donor)")
    started = time.time()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    backbone = load_model(args.ckpt, which=args.which, base_model=args.base_model, device=device, dtype=dtype)
    if not backbone.latent_ids:
        raise ValueError(f"{args.ckpt}: the checkpoint has no latents to analyse")
    result = analyze(backbone, args.data, args.mode, split=args.split, max_samples=args.max_samples,
                     seed=args.seed, max_new_tokens=args.max_new_tokens, pixel_noise=args.pixel_noise)
    result["provenance"] = {
        **checkpoint_provenance(backbone, args.ckpt, args.which, args.base_model),
        "data": data_provenance(args.data, args.split), "split": args.split, "seed": args.seed,
        "max_samples": args.max_samples, "max_new_tokens": args.max_new_tokens, "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.time() - started, 2)}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "analysis.json")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    plot_sensitivity(result, os.path.join(args.out, "sensitivity.png"))
    for name, m in result["modes"].items():
        acc = {a: round(v["accuracy"], 3) for a, v in m["accuracy"].items()}
        log.info("%s: accuracy %s; swap %s", name, acc, {k: m["swap"][k] for k in ("follow_donor", "follow_recipient",
                                                                                  "neither", "n")})
    print(f"wrote {path}")
    return result


def add_analyze_command(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="analyses of a checkpoint (latents: swaps, ablations, probes)")
    sub = p.add_subparsers(dest="analysis", required=True)
    q = sub.add_parser("latents", help="latent swaps, ablations, input sensitivity and a linear probe",
                       description=__doc__.split("\n\n")[0])
    q.add_argument("--ckpt", required=True, help="an export dir (with livr.json) or a stage run dir")
    q.add_argument("--which", default="final", choices=["final", "best"], help="export of a run dir")
    q.add_argument("--base-model", help="load the adapter onto this base instead of livr.json's")
    q.add_argument("--data", nargs="+", required=True, help="shard directories (each with manifest.json)")
    q.add_argument("--split", default="test")
    q.add_argument("--mode", nargs="+", default=list(ANALYSIS_MODES), choices=list(ANALYSIS_MODES))
    q.add_argument("--max-samples", type=int, default=64, help="the first N of a seeded shuffle of the split")
    q.add_argument("--seed", type=int, default=0, help="sample subset, swap donors, noise, probe split")
    q.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    q.add_argument("--pixel-noise", type=float, default=0.03, help="std of the image perturbation (pixels in [0, 1])")
    q.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    q.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    q.add_argument("--out", required=True, help="output directory: analysis.json, sensitivity.png")
    q.set_defaults(func=lambda args: (run(args), 0)[1])
