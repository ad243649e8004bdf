"""An offline byte-level BPE tokenizer for tiny test/demo models.

Real checkpoints bring their own tokenizer; tiny models need one that exists without a hub.
It is trained with `tokenizers` on a fixed corpus, so the same vocabulary comes out every time.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Qwen-style chat template: the format of the real Qwen2.5-VL / Qwen3-VL templates. The default
# system prompt (Qwen2.5-VL's "You are a helpful assistant.") is opt-in: `system_prompt` below.
# Real checkpoints ship their own template and it is used instead.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ default_system }}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ image_placeholder }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Which crop completes the image? Which box contains the object? How many objects are there?",
    "Which candidate is a transformed copy of the reference image? Answer with the option's letter.",
    "What is the colour of the square? red green blue yellow black white purple orange",
    "(A) (B) (C) (D) A B C D 0 1 2 3 4 5 6 7 8 9 10 yes no the a an of in on is are",
    "user assistant system image reference candidate left right top bottom about same darker",
    string.ascii_letters + string.digits + string.punctuation,
]


def build_tiny_tokenizer(special_tokens: list[str], image_token: str, vocab_size: int = 512,
                         image_placeholder: str | None = None,
                         system_prompt: str | None = None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    placeholder = image_placeholder or image_token
    default_system = ("{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
                      f"{system_prompt}<|im_end|>\n{{% endif %}}") if system_prompt else ""
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in special_tokens if t not in ("<|im_end|>", "<|endoftext|>")],
        chat_template=QWEN_CHAT_TEMPLATE.replace("{{ image_placeholder }}", placeholder)
        .replace("{{ default_system }}", default_system),
    )
    wrapped.padding_side = "right"
    return wrapped
