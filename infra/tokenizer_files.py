"""Tokenizer files: a SentencePiece .model (Llama-2, Mistral, the demo's) or a Hugging Face
tokenizer.json (byte-level BPE: Llama-3, Qwen2, SmolLM2) read through one small interface, and a
SentencePiece model trained. data.Tokenizer puts the template's special tokens on top of these.

Each backend: vocab_size, bos_id and eos_id (None where the file has none), encode(texts) with no
special token recognised in the text, decode(ids), special_id(token): the vocabulary's own id
of a template token, or None when it needs a new row, and special_ids(): the ids of the file's own
special tokens (the rest is the ordinary vocabulary).
"""

import hashlib
import io
import re
from pathlib import Path

import sentencepiece as spm

from infra.files import write_atomically


def open_tokenizer_file(path: Path):
    """Opens the backend for a file: a tokenizer.json by its suffix, else a SentencePiece model."""
    return HFTokenizer(path) if path.suffix == ".json" else SentencePiece(path)


def check_tokenizer_file(path: Path, expected_sha256: str, what: str, hint: str = ""):
    """Checks that a tokenizer file is byte for byte the one `what` (its recorded sha256): another
    would give other ids."""
    sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if sha != expected_sha256:
        raise ValueError(f"{path} (sha256 {sha[:12]}…) is not the tokenizer {what} (sha256 "
                         f"{expected_sha256[:12]}…){hint}")


class SentencePiece:
    file_name = "tokenizer.model"
    text_prefix = " "  # its dummy prefix: a text encoded on its own reads as if after a space

    def __init__(self, path: Path):
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a SentencePiece model ({str(e).strip()})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path} has no BOS or no EOS token")

    def special_id(self, token: str) -> int | None:
        if self.sp.piece_to_id(token) != self.sp.unk_id():
            raise ValueError(f"{self.path} already has a piece {token}: SentencePiece would "
                             f"then find it inside message text; use a model without it")
        return None

    def special_ids(self) -> set[int]:
        return {i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i)}

    def encode(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def transformers_config(self) -> dict:
        """Says how transformers is to load it. legacy: a "▁" after special tokens, as our
        separately encoded pieces have, so that its ids are the training ids."""
        return {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": True}


class HFTokenizer:
    """A tokenizer.json through the `tokenizers` library. Special tokens typed in text are not
    recognised (encode_special_tokens); BOS is what the tokenizer's post-processor puts before a
    text, if anything (OpenChat's rule: the ids of "")."""
    file_name = "tokenizer.json"
    text_prefix = ""

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError:
            raise ValueError(f"{path} needs the `tokenizers` library: pip install "
                             f"tokenizers==0.23.3") from None
        try:
            self.tok = Backend.from_file(str(path))
        except Exception as e:  # the library raises its own exception type for a bad file
            raise ValueError(f"{path} is not a tokenizer.json the tokenizers library reads: "
                             f"{e}") from None
        self.tok.encode_special_tokens = True
        self.path = path
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        before = self.tok.encode("", add_special_tokens=True).ids
        if len(before) > 1:
            raise ValueError(f"{path}: its post-processor puts {len(before)} tokens around a "
                             f"text; one BOS at most")
        self.bos_id = before[0] if before else None
        self.eos_id = None  # an EOS is not a tokenizer.json's notion

    def special_id(self, token: str) -> int | None:
        i = self.tok.token_to_id(token)
        added = self.tok.get_added_tokens_decoder().get(i)
        if i is not None and not getattr(added, "special", False):
            raise ValueError(f"{self.path} has {token} as an ordinary token: it would be found "
                             f"inside message text; use a tokenizer where it is a special token "
                             f"or absent")
        return i

    def special_ids(self) -> set[int]:
        return {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    def encode(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        # The library chooses its own threads.
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def transformers_config(self) -> dict:
        """Says how transformers is to load it: as the fast tokenizer it describes."""
        bos = None if self.bos_id is None else self.tok.id_to_token(self.bos_id)
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": None}


def train_sentencepiece(texts: list[str], vocab_size: int, split_digits: bool, out: Path):
    """Trains a byte-fallback BPE model set up as Llama's: no normalisation, unk 0, BOS 1, EOS 2. No
    piece joins a digit to a letter or punctuation ("12." stays "12" + "."), as GPT-2-style
    pre-tokenizers keep numbers apart: a delimiter that pieces never cross, seen only in training.
"""
    texts = [re.sub(r"(?<=\d)(?=[^\d\s])|(?<=[^\d\s])(?=\d)", "\x1f", t) for t in texts]
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, split_digits=split_digits, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False, unk_id=0, bos_id=1,
            eos_id=2, pad_id=-1, minloglevel=2, pretokenization_delimiter="\x1f")
    except RuntimeError as e:  # SentencePiece's own checks, e.g. a vocabulary the texts cannot fill
        reason = str(e).strip().splitlines()[-1]
        raise ValueError(f"training a SentencePiece model of {vocab_size} pieces on "
                         f"{len(texts):,} texts failed: {reason}") from None
    write_atomically(out, lambda tmp: tmp.write_bytes(model.getvalue()))
