"""The tokenizer of a GGUF file, as transformers reads it, with every special token the file lists whole.

``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` builds the tokenizer (vocabulary, merges, chat template)
from the file's ``tokenizer.ggml.*`` fields. For a byte-level vocabulary it skips any token the file marks as
control (type 3) or user-defined (type 4) whose spelling is outside the byte alphabet, taking it for a
mislabel; DeepSeek-R1's ``<｜User｜>``, ``<｜Assistant｜>`` and ``<｜end▁of▁sentence｜>`` are such tokens.
Then the chat template's turn markers are cut into pieces, and BOS/EOS, not found by name, are appended as new
ids beyond the model's vocabulary. ``load_gguf_tokenizer`` restores them: each such token becomes an added token
with its own id from the file (special when control), nothing is appended, and BOS/EOS/padding are the tokens
the file names by id. A file whose special tokens transformers kept (Qwen2.5's ``<|im_end|>``) is unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (gguf.TokenType)
# The header fields this module and the generation config read.
TOKENIZER_FIELDS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.padding_token_id",
)


def read_tokenizer_fields(reader) -> dict:
    """``TOKENIZER_FIELDS`` of a ``gguf.GGUFReader``'s file, by key (None where the file has none)."""
    return {key: reader.fields[key].contents() if key in reader.fields else None for key in TOKENIZER_FIELDS}


def load_gguf_tokenizer(path: Path, fields: dict):
    """The transformers tokenizer of the GGUF file ``path``; ``fields``: ``read_tokenizer_fields`` of the file."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    key_of = {index: key for key, index in vocab.items()}
    added = [entry for entry in state["added_tokens"] if entry["id"] < len(tokens)]
    whole = {entry["id"] for entry in added}
    for index, (token, kind) in enumerate(zip(tokens, types)):
        if kind not in (CONTROL, USER_DEFINED) or index in whole:
            continue
        if key_of.get(index, token) != token:
            del vocab[key_of[index]]  # the byte-level respelling transformers gave it
        vocab[token] = index
        added.append({"id": index, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": kind == CONTROL})  # fmt: skip
    if len(added) == len(state["added_tokens"]) and all(a["id"] < len(tokens) for a in state["added_tokens"]):
        return tokenizer
    state["added_tokens"] = sorted(added, key=lambda entry: entry["id"])
    special = {
        role: tokens[fields[f"tokenizer.ggml.{key}_token_id"]]
        for role, key in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"))
        if fields.get(f"tokenizer.ggml.{key}_token_id") is not None
    }
    # The tokenizer class's default unknown token may not be in this vocabulary: then there is none.
    special["unk_token"] = tokenizer.unk_token if tokenizer.unk_token in vocab else None
    return type(tokenizer)(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)), chat_template=tokenizer.chat_template, **special
    )
