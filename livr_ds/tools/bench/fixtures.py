"""What the benchmarks run on: a tiny backbone and demo samples."""

from __future__ import annotations


def tiny_backbone(model_path: str, family: str, backend: str, k: int):
    from ...config import load_config
    from ...modeling import build_backbone

    cfg = load_config(None, [f"model.family={family}", f"model.path={model_path}", f"latents.num={k}",
                             f"model.attn_backend={backend}", "lora.dropout=0.0"])
    return build_backbone(cfg, policy="bottleneck")


def demo_samples(data_dir: str, n: int):
    from ...data.loader import LivrLoader
    from ...data.sources import ShardSource

    loader = LivrLoader([ShardSource(data_dir)], 0, 1, batch_size=n, seed=0)
    return next(iter(loader))
