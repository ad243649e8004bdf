"""What a config points at (only with --config): the model path and every shard source."""

from __future__ import annotations

import json
import os

from .report import Findings


class InputChecks(Findings):
    def model(self) -> None:
        cfg = self.cfg
        if cfg is None:
            return
        from ...models.archs import ARCH_PREFIX, arch_spec

        path = cfg.model.path
        if not path:
            self.add("FAIL", "model.path", "empty", "--set model.path=DIR (a local checkpoint) or tiny:DIR")
            return
        if path.startswith("tiny:"):
            d = os.path.abspath(path[len("tiny:"):])
            if os.path.exists(os.path.join(d, "livr_tiny.json")):
                self.add("ok", "model.path", f"{path}: tiny random {cfg.model.family} model at {d}")
            else:
                parent = d
                while not os.path.exists(parent):
                    parent = os.path.dirname(parent)
                ok = os.access(parent, os.W_OK)
                self.add("ok" if ok else "FAIL", "model.path",
                         f"{path}: a tiny random model, written on first use at {d}",
                         "" if ok else f"{parent} is not writable")
            return
        if path.startswith(ARCH_PREFIX):
            try:
                spec, layers = arch_spec(path)
            except ValueError as e:
                self.add("FAIL", "model.path", str(e))
                return
            if spec["family"] != cfg.model.family:
                self.add("FAIL", "model.path", f"{path} is a {spec['family']} architecture but model.family is "
                         f"{cfg.model.family}", f"--set model.family={spec['family']}")
                return
            self.add("ok", "model.path", f"{path}: the published architecture, random weights (no download)")
            return
        if not os.path.isdir(path):
            self.add("FAIL", "model.path", f"{path} does not exist (or is not a directory)",
                     "livr-ds loads checkpoints offline: download one first (huggingface-cli download <repo> "
                     "--local-dir DIR on a machine with network) and set model.path=DIR")
            return
        files = set(os.listdir(path))
        problems = []
        if "config.json" not in files:
            problems.append("no config.json")
        if not any(f.endswith((".safetensors", ".bin")) or f.endswith(".index.json") for f in files):
            problems.append("no weights (*.safetensors)")
        if not files & {"preprocessor_config.json", "processor_config.json"}:
            problems.append("no preprocessor_config.json (the image processor)")
        if not files & {"tokenizer.json", "tokenizer.model", "vocab.json"}:
            problems.append("no tokenizer files (tokenizer.json)")
        template = files & {"chat_template.jinja", "chat_template.json"}
        if not template and "tokenizer_config.json" in files:
            with open(os.path.join(path, "tokenizer_config.json")) as f:
                template = {"tokenizer_config.json"} if "chat_template" in json.load(f) else set()
        if not template:
            problems.append("no chat template")
        if problems:
            self.add("FAIL", "model.path", f"{path}: {'; '.join(problems)}",
                     "point model.path at a complete checkpoint directory (config, weights, processor, tokenizer)")
            return
        model_type = None
        if "config.json" in files:
            with open(os.path.join(path, "config.json")) as f:
                model_type = json.load(f).get("model_type")
        if model_type and model_type != cfg.model.family and not cfg.model.trust_remote_code:
            self.add("warn", "model.path", f"{path}: config.json says model_type {model_type!r}, model.family is "
                     f"{cfg.model.family!r}", f"--set model.family={model_type} if that is the family")
            return
        self.add("ok", "model.path", f"{path}: config.json ({model_type}), weights, processor and tokenizer files")

    def data(self) -> None:
        cfg = self.cfg
        if cfg is None:
            return
        if not cfg.data.train:
            self.add("FAIL", "data.train", "empty", "--set data.train=[SHARD_DIR]")
            return
        if self.quick:
            self.add("note", "data", "shards not scanned (--quick): the trainer resolves them first and stops with "
                     "exit 2 on a missing one")
            return
        from ...data.schema import DataError
        from ...data.sources import ShardSource

        for key, sources, split in (("data.train", cfg.data.train, cfg.data.train_split),
                                    ("data.val", cfg.data.val, cfg.data.val_split)):
            for s in sources:
                try:
                    # A check must not change what it checks: indexes it builds go to the cache dir.
                    shards = ShardSource(s.path, weight=s.weight, split=split).resolve(store_beside=False)
                except (DataError, OSError) as e:
                    self.add("FAIL", key, str(e),
                             "write shards with `livr-ds shards ...` (docs/data.md) or fix the path")
                    continue
                n = sum(sh.count for sh in shards)
                self.add("ok", key, f"{s.path} ({split}): {len(shards)} shard(s), {n} samples")
