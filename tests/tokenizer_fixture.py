"""A real LLaMA-style SentencePiece tokenizer for tests, built offline.

mistral-common ships the 32000-piece SentencePiece model of Mistral-7B v0.1, which has LLaMA's layout
(<unk>=0, <s>=1, </s>=2, byte fallback, ``▁`` word marker), so SegLLM's added tokens land on
32000..32010 exactly as on LLaVA's vocabulary. Only the ids of ordinary words differ from LLaMA's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mistral_common

_SENTENCEPIECE_MODEL = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"

#: The tokenizer_config.json of LLaVA-1.5 checkpoints, reduced to the fields that affect tokenization.
LLAVA_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "padding_side": "right",
    "model_max_length": 2048,
}


def make_llama_tokenizer_dir(path: str | Path, with_config: bool = False) -> Path:
    """Put ``tokenizer.model`` (and, if asked, LLaVA's ``tokenizer_config.json``) into ``path``.

    Without the config the folder looks like a bare SentencePiece export; with it, like a LLaVA-1.5
    checkpoint folder, which ``AutoTokenizer`` loads.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_SENTENCEPIECE_MODEL, folder / "tokenizer.model")
    if with_config:
        (folder / "tokenizer_config.json").write_text(json.dumps(LLAVA_TOKENIZER_CONFIG, indent=2))
    return folder
