"""The streaming `export --merge`: the base checkpoint's tensors are read, changed as training
changed them and written out one at a time, so a 72B merge needs the memory of its largest tensor
(and of the adapter), not of the model.

What training changed, and what the in-memory merge (PEFT's merge_and_unload) makes of it:
  LoRA        W + scaling * B @ A for every adapted Linear, in float32, cast once to the merge dtype
  the table   grown to the export's tokenizer (latents.resize_embeddings), the K latent rows
              replaced by the trained rows; an untied head's new rows are zero, a tied head is the
              table itself (not stored, as save_pretrained does)
Which tensors exist, their names in the merged checkpoint, config.json and the index are
transformers' own: a model of the base's config built on the meta device (no memory), the
checkpoint's names mapped to its modules by the conversion mapping from_pretrained applies, and
back by save_pretrained's revert_weight_conversion; shards are split as save_pretrained splits them.

Tensors are read with plain file reads rather than safetensors' safe_open: safe_open maps the
file, and every page a tensor touched stays resident (and counted in RSS) until the file is
closed, so reading a 5 GB shard through it costs 5 GB. The safetensors format (an 8-byte header
length, a JSON header, the raw bytes) is written the same way, tensor by tensor.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct

import torch

from ..config import ConfigError
from ..latents import PEFT_ROWS_SUFFIX

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_NAMES = {v: k for k, v in DTYPES.items()}
_PEFT_PREFIX = "base_model.model."


class Unsupported(Exception):
    """What the streaming merge does not reproduce; merge.py falls back to the in-memory merge."""


class SafetensorsFile:
    """One safetensors file: its header, and one tensor at a time read into memory of its own."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            # safetensors' own bound on the header (100 MB); within the file
            if not 0 < n <= min(100_000_000, size - 8):
                raise ConfigError(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (ValueError, RecursionError) as exc:
                raise ConfigError(f"{path}: safetensors header is not valid JSON ({exc})") from None
        self.data_start, self.data_bytes = 8 + n, size - 8 - n
        self.metadata = header.pop("__metadata__", None)
        self.entries = header

    def read(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        want = math.prod(entry["shape"]) * DTYPES[entry["dtype"]].itemsize
        if not (0 <= begin <= end <= self.data_bytes and end - begin == want):
            raise ConfigError(f"{self.path}: {key}: data_offsets {entry['data_offsets']} do not fit its shape "
                              f"{entry['shape']} {entry['dtype']} or the file")
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if end > begin and f.readinto(memoryview(buf.numpy())) != end - begin:
                raise ConfigError(f"{self.path}: {key} is cut short (truncated file?)")
        return buf.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def open_checkpoint(path: str) -> dict[str, SafetensorsFile]:
    """tensor name -> its file, for a directory of model.safetensors or shards with an index."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise Unsupported(f"{path} holds no safetensors checkpoint (model.safetensors or an index)")
    out = {}
    for name in files:
        st = SafetensorsFile(os.path.join(path, name))
        if any(e["dtype"] not in DTYPES for e in st.entries.values()):
            raise Unsupported(f"{st.path}: a tensor dtype this reader does not know")
        out.update(dict.fromkeys(st.entries, st))
    return out


def write_safetensors(path: str, specs: dict[str, tuple[tuple, torch.dtype]], produce) -> None:
    """A safetensors file of `specs` (name -> (shape, dtype)); produce(name) makes each tensor just
    before it is written, so the file's tensors are never all in memory. Header padded to 8 bytes
    and tensors ordered by name, the layout safetensors' own writer gives."""
    header, offset = {}, 0
    for name in sorted(specs):
        shape, dtype = specs[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in sorted(specs):
            t = produce(name)
            if tuple(t.shape) != tuple(specs[name][0]) or t.dtype != specs[name][1]:
                raise RuntimeError(f"{name}: made {tuple(t.shape)} {t.dtype}, planned {specs[name]}")
            f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            del t
            release_freed_memory()
        f.flush()
        os.fsync(f.fileno())


def release_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim). Tensors of a few MB come from
    the heap once glibc raised its mmap threshold, and tensors of ever-changing sizes leave it
    fragmented: without this the merge's RSS creeps up by a few tensors' worth a layer."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc: nothing to do
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


class Adapter:
    """An adapter export's LoRA updates (by the module weight they change) and latent rows."""

    def __init__(self, export_dir: str):
        from safetensors.torch import load_file

        with open(os.path.join(export_dir, "adapter_config.json")) as f:
            cfg = json.load(f)
        for key, ok in (("peft_type", "LORA"), ("use_dora", False), ("lora_bias", False), ("fan_in_fan_out", False),
                        ("modules_to_save", None), ("target_parameters", None), ("layer_replication", None),
                        ("rank_pattern", {}), ("alpha_pattern", {})):
            if cfg.get(key, ok) not in (ok, None, {}):
                raise Unsupported(f"adapter_config.json has {key}={cfg[key]!r}")
        r, alpha = cfg["r"], cfg["lora_alpha"]
        self.scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r  # PEFT's LoraLayer
        tensors = load_file(os.path.join(export_dir, "adapter_model.safetensors"))
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rows = self.rows_weight = self.row_ids = None
        for key, t in tensors.items():
            if not key.startswith(_PEFT_PREFIX):
                raise Unsupported(f"adapter tensor {key}: not under {_PEFT_PREFIX!r}")
            name = key[len(_PEFT_PREFIX):]
            if name.endswith(PEFT_ROWS_SUFFIX):
                indices = cfg.get("trainable_token_indices")
                ids = next(iter(indices.values())) if isinstance(indices, dict) and len(indices) == 1 else indices
                if self.rows is not None or not isinstance(ids, list) or len(ids) != t.shape[0]:
                    raise Unsupported(f"trainable tokens {key} {tuple(t.shape)} with indices {indices!r}")
                self.rows, self.row_ids = t, ids
                self.rows_weight = name[:-len(PEFT_ROWS_SUFFIX)] + ".weight"
            elif name.endswith((".lora_A.weight", ".lora_B.weight")):
                weight = name[:-len(".lora_A.weight")] + ".weight"
                pair = self.lora.setdefault(weight, [None, None])
                pair[name.endswith(".lora_B.weight")] = t
            else:
                raise Unsupported(f"adapter tensor {key}: neither LoRA A/B nor the latent rows")
        for weight, (a, b) in self.lora.items():
            if a is None or b is None or a.shape[0] != r or b.shape[1] != r:
                raise Unsupported(f"{weight}: LoRA A/B missing or not of rank {r}")

    def delta(self, weight: str) -> torch.Tensor:
        """scaling * B @ A in float32, as PEFT's get_delta_weight computes it on CPU."""
        a, b = self.lora[weight]
        return (b.float() @ a.float()).mul_(self.scaling)


def _module_name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def meta_model(model_class, base_dir: str, dtype: torch.dtype):
    """The base's model on the meta device, with the renamings from_pretrained applies to its
    checkpoint recorded as from_pretrained records them (save_pretrained reverts those)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    config = model_class.config_class.from_pretrained(base_dir)
    with torch.device("meta"):
        model = model_class._from_config(config, dtype=dtype)
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    state = model.state_dict()
    checkpoint = open_checkpoint(base_dir)
    source: dict[str, str] = {}  # model's parameter name -> checkpoint tensor name
    for key in sorted(checkpoint):
        # As core_model_loading.convert_and_load_state_dict_in_model renames a checkpoint key.
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        if name not in state and key in state:
            name, pattern = rename_source_key(key, [], [], model.base_model_prefix, state)
        if pattern is not None:
            raise Unsupported(f"{key}: transformers converts this tensor on load (not a rename)")
        if name in state:
            source[name] = key
    model._weight_conversions = [c for c in conversions if c.was_used()]
    return model, source, checkpoint


def stream_merge(model_class, base_dir: str, export_dir: str | None, num_tokens: int, dtype: torch.dtype,
                 max_shard_size, out_dir: str) -> int:
    """Write the merged weights, config.json and (sharded) index into out_dir; returns the
    table's rows. export_dir None: no adapter (a full fine-tune export re-cast and re-sharded)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model, source, checkpoint = meta_model(model_class, base_dir, dtype)
    adapter = Adapter(export_dir) if export_dir else None
    embed = _module_name(model, model.get_input_embeddings()) + ".weight"
    old_rows = model.get_input_embeddings().weight.shape[0]
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    head = None if head is None or tied else _module_name(model, head) + ".weight"
    if num_tokens > old_rows:  # latents.resize_embeddings; its config changes are transformers'
        covered = set(adapter.row_ids if adapter and adapter.rows is not None else [])
        if not set(range(old_rows, num_tokens)) <= covered:  # resize_token_embeddings draws those at random
            raise Unsupported(f"the table grows from {old_rows} to {num_tokens} rows, not all of them latent rows")
        model.resize_token_embeddings(num_tokens, mean_resizing=False)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    missing = sorted(set(state) - set(source))
    if missing:
        raise Unsupported(f"the base checkpoint has no tensor for {missing[:3]} (from_pretrained would draw them)")
    if adapter:
        unknown = sorted({*adapter.lora, *([adapter.rows_weight] if adapter.rows is not None else [])} - set(state))
        if unknown:
            raise ConfigError(f"{export_dir}: the adapter changes {unknown[:3]}, which the base {base_dir} lacks")
        if adapter.rows is not None and adapter.rows_weight != embed:
            raise Unsupported(f"the latent rows belong to {adapter.rows_weight}, the input embedding is {embed}")
    by_id = {id(t): name for name, t in state.items()}
    out_names = {out: by_id[id(t)] for out, t in revert_weight_conversion(model, dict(state)).items()}

    def out_dtype(name):
        return dtype if state[name].is_floating_point() else state[name].dtype

    def produce(out: str) -> torch.Tensor:
        name = out_names[out]
        t = checkpoint[source[name]].read(source[name])
        if adapter and name in adapter.lora:
            t = t.float()  # a copy of its own unless the checkpoint is float32 (then the read buffer)
            t += adapter.delta(name)  # PEFT's merge, in float32
        if name in (embed, head) and t.shape[0] < state[name].shape[0]:
            grown = torch.zeros(state[name].shape, dtype=t.dtype)  # new head rows are zero (resize_embeddings)
            grown[:t.shape[0]] = t
            t = grown
        if adapter and adapter.rows is not None and name == embed:
            t[adapter.row_ids] = adapter.rows.to(t.dtype)  # PEFT's trainable tokens: the rows' values
        return t.to(out_dtype(name))

    metas = {out: torch.empty(state[name].shape, dtype=out_dtype(name), device="meta")
             for out, name in out_names.items()}
    split = split_torch_state_dict_into_shards(metas, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        write_safetensors(os.path.join(out_dir, filename),
                          {n: (tuple(metas[n].shape), metas[n].dtype) for n in names}, produce)
    if split.is_sharded:  # save_pretrained's index
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    # save_pretrained's config: the dtype and class it records
    model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    return model.get_input_embeddings().weight.shape[0]
