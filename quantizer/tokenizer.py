"""A small working tokenizer for synthetic and test models, shaped like DeepSeek-R1-Distill-Qwen's.

``build_tokenizer(out_dir, vocab_size)`` trains a byte-level BPE on the built-in text below (plus made-up
words, so that large vocabularies have pairs to merge) and saves it as
a transformers fast tokenizer (``tokenizer.json``, ``tokenizer_config.json``, the chat template), so
``AutoTokenizer.from_pretrained(out_dir)`` and ``apply_chat_template`` behave as they do for the real model:

* special tokens, in this order, take ids 0..6: ``<｜begin▁of▁sentence｜>`` (BOS),
  ``<｜end▁of▁sentence｜>`` (EOS, also the pad token), ``<｜User｜>``, ``<｜Assistant｜>``, ``<think>``,
  ``</think>``, ``<｜▁pad▁｜>``;
* then the 256 byte-level symbols, then merges up to ``vocab_size``; every byte string can be encoded;
* the chat template is DeepSeek-R1's: BOS, an optional system prompt, ``<｜User｜>…``, ``<｜Assistant｜>…``
  with the reasoning before ``</think>`` dropped from past replies, and a generation prompt
  ``<｜Assistant｜><think>\\n``.

Plain ``encode`` adds no BOS: the chat template writes it, and raw prompts are fed exactly as tokenized.
Training is deterministic, so the same ``vocab_size`` gives the same tokenizer every time.
"""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
PAD_TOKEN = "<｜▁pad▁｜>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, THINK_OPEN, THINK_CLOSE, PAD_TOKEN)
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE

# DeepSeek-R1-Distill's template, reduced to what these models use (no tool calls).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER_TOKEN + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}"
    "{% if '" + THINK_CLOSE + "' in content %}{% set content = content.split('" + THINK_CLOSE + "')[-1] %}{% endif %}"
    + ASSISTANT_TOKEN + "{{ content }}" + EOS_TOKEN +
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT_TOKEN + THINK_OPEN + "\n{% endif %}"
)

# Built-in training text: enough variety (prose, code, numbers, punctuation) for the merges to be ordinary.
TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A large language model predicts the next token from the ones
before it. When the weights do not fit in the memory of the graphics card, they can be streamed from the
host, one layer at a time, while the card computes the layer before. Quantization to four bits makes every
weight eight times smaller than a 32-bit float and four times smaller than bfloat16.
Question: What is the capital of France? Answer: The capital of France is Paris.
Question: How many legs does a spider have? Answer: A spider has eight legs.
Let me think step by step. First, we add 17 and 25 to get 42. Then we divide 42 by 6, which gives 7.
def add(a, b):
    return a + b

for i in range(10):
    print(i * i)
The history of computing is a story of memory hierarchies: registers, caches, main memory, disks and
networks, each larger and slower than the one before. Good systems keep the data they need next close by.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2048 4096 65536; dates like 2026-11-29; prices like $3.50.
Hello! How are you today? I am fine, thank you. Please write a short poem about the sea.
The sea is wide, the sea is deep, it rocks the boats and sings to sleep.
"""

SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "ba", "do", "fi", "gu", "ha", "ji", "pe", "qu", "wy")


def _training_corpus(vocab_size: int) -> list[str]:
    """The built-in text plus made-up words from a fixed seed, so that large vocabularies have pairs to merge."""
    rng = random.Random(0)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(2, 5))) for _ in range(10 * vocab_size)]
    return [TRAINING_TEXT] * 4 + [" ".join(words[i : i + 100]) for i in range(0, len(words), 100)]


def build_tokenizer(out_dir: str | Path, vocab_size: int) -> None:
    """Train the byte-level BPE with ``vocab_size`` entries and save it, with its chat template, in ``out_dir``."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"tokenizer vocab_size {vocab_size} is too small: the {len(SPECIAL_TOKENS)} special tokens and "
            f"{BYTE_ALPHABET_SIZE} byte symbols alone need {MIN_VOCAB_SIZE}"
        )
    # Imported here: transformers is slow to import and only this step needs it.
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(vocab_size), trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[USER_TOKEN, ASSISTANT_TOKEN, THINK_OPEN, THINK_CLOSE, PAD_TOKEN],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
