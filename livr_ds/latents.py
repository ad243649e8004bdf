"""The K latent tokens: vocabulary entries, their trainable embedding rows, and how those rows
reach the model in training and in an export.

In training the rows are a parameter of their own (`LatentRows`, shape (unique latents, hidden)),
placed into the input embeddings by a forward hook on the embedding layer and, when the head is
tied to the table (Qwen2.5-VL-3B, Qwen3-VL-4B), into the head's logits for those tokens by a hook
on the LM head. The embedding table itself stays frozen and whole.

Why not PEFT's `trainable_token_indices` (used before): under ZeRO-3 the table is partitioned
and PEFT's layer indexes into a rank's empty shard (`index_copy_(): Number of indices (4) ...
source.size(dim) (0)`; PEFT's tracker has open ZeRO-3 issues for trainable tokens, e.g.
huggingface/peft#2946), and its forward copies the whole table (vocab x hidden) on every call.
A small module of its own is partitioned, gathered and stepped by DeepSpeed like any LoRA
matrix, at every ZeRO stage, and touches only the latent positions.

Exports keep PEFT's format (the rows saved as PEFT's trainable-token tensor, with
`trainable_token_indices` in adapter_config.json), so an export still loads with transformers +
PEFT alone and PEFT applies the rows to the embedding and a tied head exactly as training did.
"""

from __future__ import annotations

import torch

from . import distributed as dist

# PEFT's names for trainable tokens in a saved adapter (peft 0.21, tuners/trainable_tokens):
# <module path>.token_adapter.trainable_tokens_delta holds the rows' values (not a difference).
PEFT_ROWS_SUFFIX = ".token_adapter.trainable_tokens_delta"


def latent_token_strings(num: int, shared: bool) -> list[str]:
    """The K latent tokens in order. Shared latents are one token repeated K times."""
    if num == 0:
        return []
    return ["<|latent|>"] * num if shared else [f"<|latent_{i}|>" for i in range(num)]


def add_latent_tokens(tokenizer, model, num: int, shared: bool, seed: int) -> list[int]:
    """Add the latent tokens to the vocabulary and give their embedding rows a random init.

    Returns the K token ids in sequence order (repeated ids for shared latents).
    """
    strings = latent_token_strings(num, shared)
    if not strings:
        return []
    new = sorted(set(strings), key=strings.index)
    tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(strings)
    resize_embeddings(model, len(tokenizer))
    embed = model.get_input_embeddings()
    # Every rank draws the same rows; under ZeRO-3 (a model built partitioned) rank 0's are kept.
    with dist.gathered([embed.weight], modifier_rank=0), torch.no_grad():
        std = embed.weight.float().std().item()
        gen = torch.Generator().manual_seed(seed)
        unique = sorted(set(ids))
        rows = torch.randn(len(unique), embed.weight.shape[1], generator=gen) * std
        embed.weight[unique] = rows.to(device=embed.weight.device, dtype=embed.weight.dtype)  # CUDA table
    return ids


def resize_embeddings(model, vocab_size: int) -> None:
    """Grow the vocabulary to `vocab_size`. New output-head rows are zero, not random: latents are
    never generated, and a reloaded export must give the same logits as the trained model.

    A tied head IS the embedding table, so its new rows are the latents' input rows (trained
    through LatentRows' head hook, and through PEFT's tied trainable tokens when an export is
    loaded). No resize happens when the table already has spare rows beyond the tokenizer (the
    released Qwen checkpoints have hundreds): the latents take those rows and their head rows."""
    old = full_shape(model.get_input_embeddings().weight)[0]
    if vocab_size <= old:
        return
    model.resize_token_embeddings(vocab_size, mean_resizing=False)  # gathers a partitioned table itself
    out = model.get_output_embeddings()
    if out is not None and out.weight is not model.get_input_embeddings().weight:
        with dist.gathered([out.weight], modifier_rank=0), torch.no_grad():
            out.weight[old:] = 0


def full_shape(t: torch.Tensor) -> tuple:
    """The whole tensor's shape, also for a ZeRO-3 parameter (which holds a flat shard)."""
    return tuple(getattr(t, "ds_shape", t.shape))


def head_is_tied(hf_model) -> bool:
    out = hf_model.get_output_embeddings()
    return out is not None and out.weight is hf_model.get_input_embeddings().weight


class LatentRows(torch.nn.Module):
    """The trainable embedding rows of the unique latent tokens.

    Called as a module (so that ZeRO-3 gathers `weight` around the call) from two hooks:
    `embeddings(ids, embeds)` puts row i at every position holding latent token i, and
    `head(hidden, logits)` recomputes the logits of the latent tokens from the rows (tied head)."""

    def __init__(self, token_ids: list[int], rows: torch.Tensor):
        super().__init__()
        if len(token_ids) != rows.shape[0] or sorted(set(token_ids)) != list(token_ids):
            raise ValueError(f"LatentRows: token ids {token_ids} must be unique, sorted and one per row")
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.weight = torch.nn.Parameter(rows.detach().clone())

    def forward(self, x: torch.Tensor, out: torch.Tensor, head: bool = False) -> torch.Tensor:
        ids = self.token_ids.to(out.device)
        if head:  # x: hidden states (..., H); out: logits (..., V)
            latent_logits = (x @ self.weight.t().to(x.dtype)).to(out.dtype)
            return out.index_copy(out.dim() - 1, ids, latent_logits)
        match = x.unsqueeze(-1) == ids  # (..., n): which latent (if any) each position holds
        is_latent = match.any(-1, keepdim=True)
        rows = self.weight.to(out.dtype)[match.to(torch.long).argmax(-1)]
        return torch.where(is_latent, rows, out)

    def attach(self, hf_model) -> list:
        """Register the hooks on the model's embedding (and a tied head); returns the handles."""
        handles = [hf_model.get_input_embeddings().register_forward_hook(
            lambda module, args, out: self(args[0], out))]
        if head_is_tied(hf_model):
            handles.append(hf_model.get_output_embeddings().register_forward_hook(
                lambda module, args, out: self(args[0], out, head=True)))
        return handles


def build_latent_rows(hf_model, latent_ids: list[int]) -> LatentRows | None:
    """LatentRows initialised from the table's current rows (add_latent_tokens' random init)."""
    unique = sorted(set(latent_ids))
    if not unique:
        return None
    table = hf_model.get_input_embeddings().weight
    with dist.gathered([table]), torch.no_grad():
        rows = table[unique].clone()
    return LatentRows(unique, rows)


def embedding_module_path(peft_model) -> str:
    """The embedding layer's name in the PEFT model's state dict (what PEFT keys its rows by)."""
    target = peft_model.get_input_embeddings()
    for name, module in peft_model.named_modules():
        if module is target:
            return name
    raise ValueError("the model's input embedding layer is not among its modules")


def peft_rows_key(peft_model) -> str:
    """The saved-adapter key of the latent rows, e.g.
    base_model.model.model.language_model.embed_tokens.token_adapter.trainable_tokens_delta."""
    return embedding_module_path(peft_model) + PEFT_ROWS_SUFFIX


def split_adapter_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """A saved adapter's tensors -> (LoRA tensors, the latent rows or None)."""
    rows = [k for k in tensors if k.endswith(PEFT_ROWS_SUFFIX)]
    if len(rows) > 1:
        raise ValueError(f"adapter holds {len(rows)} trainable-token tensors ({rows}); livr-ds writes one")
    lora = {k: v for k, v in tensors.items() if not k.endswith(PEFT_ROWS_SUFFIX)}
    return lora, (tensors[rows[0]] if rows else None)
