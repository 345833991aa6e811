"""The streaming detokenizer gives exactly what decoding all ids at once gives."""

from __future__ import annotations

import random

import pytest
from deltaserve.engine.detokenizer import IncrementalDetokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

TEXT = [
    "Grüße aus Köln — ein schöner Tag! 日本語のテキストと絵文字 🎉🚀 ok",
    "def f(x):\n    return x ** 2  # tabs\tand  double  spaces",
    "Ünïcödé ünd ÄÖÜ; Ελληνικά; русский текст; 中文字符",
] * 20


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _stream(tok, ids: list[int], stop=()) -> tuple[str, bool]:
    d = IncrementalDetokenizer(tok, stop)
    out, hit = "", False
    for token in ids:
        new, hit = d.push(token)
        out += new
        if hit:
            return out, True
    return out + d.flush(), False


@pytest.mark.parametrize("seed", range(6))
def test_stream_equals_full_decode_on_byte_level_bpe(seed):
    tok = _byte_level_bpe()
    rng = random.Random(seed)
    encoded = tok.encode(rng.choice(TEXT), add_special_tokens=False)
    random_ids = [rng.randrange(len(tok)) for _ in range(60)]  # includes specials and split bytes
    for ids in (encoded, random_ids, encoded[:7] + random_ids[:9] + encoded[7:]):
        full = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        got, _ = _stream(tok, ids)
        assert got == full


def test_stream_holds_back_stop_strings():
    tok = _byte_level_bpe()
    ids = tok.encode("def f(x):\n    return x ** 2", add_special_tokens=False)
    got, hit = _stream(tok, ids, stop=("return",))
    assert hit and got == "def f(x):\n    "
