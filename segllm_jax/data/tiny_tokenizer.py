"""A small LLaMA-style tokenizer trained on our own text (MR-Shapes questions), saved with a checkpoint.

Real SegLLM uses Vicuna's 32000-piece SentencePiece model; a tiny model trained on CPU needs a tiny
vocabulary. This trains a Unigram model with SentencePiece-style spacing (``▁`` marks word starts,
prepended to the first piece only, as LLaVA-1.5's non-legacy tokenizer does) and the LLaMA special
tokens ``<unk>``=0, ``<s>``=1, ``</s>``=2, adds BOS and no EOS, and saves it as an HF fast tokenizer
that :meth:`segllm_jax.tokenizer.SegTokenizer.from_pretrained` loads like a released one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL = ("<unk>", "<s>", "</s>")


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Trains on ``texts`` and writes ``tokenizer.json`` + ``tokenizer_config.json`` into ``out_dir``."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL), unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>", model_max_length=2048, padding_side="right")
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir
