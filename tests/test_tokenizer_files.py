"""tokenizer_files.py: tokenizer.json files against llama.cpp's recorded ids, a refused or unreadable
file named, and the trained SentencePiece model's pieces never joining a number to its neighbours."""

import re

import numpy as np
import pytest
import sentencepiece as spm

from data import Tokenizer
from infra.tokenizer_files import train_sentencepiece
from tools import assets


def test_a_tokenizer_that_already_has_the_special_token_is_refused(tmp_path):
    import io
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 50), model_writer=model, vocab_size=12,
                                   user_defined_symbols=["<|end_of_turn|>"], minloglevel=2)
    (tmp_path / "t.model").write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="already has a piece <\\|end_of_turn\\|>"):
        Tokenizer(tmp_path / "t.model", "openchat_v3.2")


def test_tokenizer_pieces_never_join_a_number_to_punctuation_or_letters(tmp_path):
    """Numbers that end sentences ("is 12.") or touch letters ("GPT4") are frequent enough here for BPE to
    merge them; with split_digits off, numbers still stay pieces of their own."""
    rng = np.random.default_rng(0)
    texts = [f"The smallest is {rng.integers(100)}. After {rng.integers(100)}, GPT{rng.integers(5)}: "
             f"x{rng.integers(9)}." for _ in range(3000)]
    train_sentencepiece(texts, 420, split_digits=False, out=tmp_path / "t.model")
    tokenizer = Tokenizer(tmp_path / "t.model", "text")
    vocabulary = [tokenizer.backend.sp.id_to_piece(i) for i in range(tokenizer.base_vocab_size)]
    assert sum(bool(re.fullmatch(r"▁\d\d", p)) for p in vocabulary) > 80  # whole two-digit numbers
    assert not [p for p in vocabulary if re.search(r"\d[^\d]|[^\d▁]\d", p) and not p.startswith("<0x")]
    for n in (7, 12, 99):
        for text in (f"is {n}.", f"{n}, then", f"GPT{n}:"):
            pieces = [tokenizer.backend.sp.id_to_piece(i) for i in tokenizer.encode([text])[0]]
            numeric = [p for p in pieces if re.search(r"\d", p) and not p.startswith("<0x")]
            assert all(re.fullmatch(r"▁?\d+", p) for p in numeric) and "".join(numeric).lstrip("▁") == str(n)
            assert text.startswith("GPT") or numeric == [f"▁{n}"], (text, pieces)


@pytest.mark.parametrize("name", ["llama-bpe", pytest.param("qwen2", marks=pytest.mark.slow),
                                  pytest.param("gpt-2", marks=pytest.mark.slow)])
def test_tokenizer_json_gives_llama_cpp_expected_ids(name, llama3, tmp_path_factory):
    """llama.cpp's test texts (accents, emoji, code, runs of spaces and newlines) through data.Tokenizer give
    the ids llama.cpp recorded from each family's reference tokenizer. For Llama-3 the tokenizer is ours, made
    from Meta's tiktoken ranks (assets.py), so this also checks that conversion."""
    vocab = assets.fetch_llama_cpp_vocab(name)
    path = (llama3 if name == "llama-bpe" else
            assets.gguf_tokenizer_json(vocab, tmp_path_factory.mktemp(name) / "tokenizer.json"))
    tokenizer = Tokenizer(path, "openchat_3.5")
    cases = assets.llama_cpp_cases(vocab)
    assert len(cases) > 40
    for (text, expected), ids in zip(cases, tokenizer.encode([t for t, _ in cases])):
        assert ids == expected, text


def test_a_missing_tokenizers_library_or_a_bad_tokenizer_json_is_named(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json is not a tokenizer.json the tokenizers library reads"):
        Tokenizer(bad, "openchat_3.6")
