"""Writing an export (`export/best`, `export/final` of every stage run): the PEFT adapter, the
tokenizer with the latent tokens, the processor files, the serving files (a chat template that
adds the latents, generation_config.json), livr.json and the model card, swapped in atomically."""

from __future__ import annotations

import logging
import os
import shutil

from ..atomic import replace_dir, write_json_atomic
from ..latents import full_shape
from .. import distributed as dist
from .card import render_card, training_record
from .metadata import livr_metadata
from .serving import write_serving_files
from .tensors import is_peft, trainable_state, write_adapter

log = logging.getLogger(__name__)


def save_export(backbone, cfg, stage: int, out_dir: str, extra: dict | None = None, *,
                validation: list[dict] | None = None, init_from: str | None = None) -> str | None:
    """Collective (every rank calls it: ZeRO-3 gathers the trainable shards); rank 0 writes.

    `validation`: the stage's validations so far (report.run.validation_history), for livr.json
    and the card's tables; `init_from`: the Stage 1 export this stage started from (its record joins the card)."""
    model = backbone.model
    if not is_peft(model.peft_model):
        # A full fine-tune is a whole transformers checkpoint (ZeRO-3 is refused for it at start-up).
        extra = {**(extra or {}), "merged": True}
        tensors = None
    else:
        tensors = trainable_state(model)
    vocab_rows = full_shape(model.hf_model.get_input_embeddings().weight)[0]
    if not dist.is_main():
        return None
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if tensors is None:
        model.peft_model.save_pretrained(tmp)
    else:
        write_adapter(model, tensors, tmp, backbone.latent_ids, backbone.adapter.input_embeddings_name())
    processor = backbone.processor
    processor.tokenizer.save_pretrained(tmp)
    processor.image_processor.save_pretrained(tmp)
    src_proc = os.path.join(backbone.path, "processor_config.json")
    if os.path.exists(src_proc):
        shutil.copy(src_proc, tmp)
    write_serving_files(tmp, processor, backbone.latent_ids, vocab_rows)
    meta = {**livr_metadata(cfg, backbone, stage), **(extra or {}),
            "training": training_record(cfg, stage, validation or [], init_from)}
    write_json_atomic(os.path.join(tmp, "livr.json"), meta)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(render_card(meta))
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    replace_dir(tmp, out_dir)
    log.info("exported %s", out_dir)
    return out_dir
