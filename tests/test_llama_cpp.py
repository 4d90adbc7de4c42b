"""train.py's exports through llama.cpp's own converter (convert_hf_to_gguf.py from the llama.cpp sources in the
llama-cpp-python 0.3.36 sdist, run as a user runs it) and into ollama's Modelfile: for a SentencePiece tokenizer
with <|end_of_turn|> added (the demo's, openchat_v3.2) and a tokenizer.json whose 3.6 header tokens are new rows
(SmolLM2's), the GGUF carries the chat template, the end of a turn as a control token and as EOS (which llama.cpp's
loader puts among its end-of-generation tokens), every new token as one vocabulary entry, and the export's tensors
exactly; the Modelfile's TEMPLATE gives the Jinja's text. llama.cpp itself is not built here (LLAMA_CPP.md is a
transcript of it run by hand)."""

import json
import re
import subprocess
import sys

import jinja2
import pytest
import torch
from gguf import GGUFReader, TokenType

import data
from conftest import ROOT
from data import PrepareConfig, prepare
from demo import DemoConfig, make_demo
from infra.hf import load_pretrained
from infra.records import Message
from tools import assets

pytestmark = pytest.mark.slow  # the whole file: the full suite only

CONVERSATION = [{"role": "system", "content": "Answer with numbers only."},
                {"role": "user", "content": "Sort these numbers from smallest to largest: 12 9 3"},
                {"role": "assistant", "content": "3 9 12"},
                {"role": "user", "content": "And these: 5 1 77"}]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{kind: an export of train.py after one step of a tiny model}."""
    tmp = tmp_path_factory.mktemp("llama_cpp")
    make_demo(DemoConfig(out=str(tmp / "demo"), conversations=240, holdout_prompts=20, validation_prompts=20,
                         base_documents=200, vocab_size=420, seed=1))
    smollm2 = assets.smollm2_folder()
    prepare(PrepareConfig(sources=str(tmp / "demo" / "sources.json"), tokenizer=str(smollm2 / "tokenizer.json"),
                          template="openchat_3.6", out=str(tmp / "smollm2-dataset"), max_len=256))
    datasets = {"sentencepiece": tmp / "demo" / "dataset", "tokenizer.json": tmp / "smollm2-dataset"}
    for kind, dataset in datasets.items():
        run = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--data={dataset}", "--base=",
                              f"--out={tmp / kind}", "--model=tiny", "--max-steps=1", "--batch-max-len=256"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    return {kind: tmp / kind / "exports" / "step-1" for kind in datasets}


def convert(export, out):
    """llama.cpp's converter, as its README runs it, to float32 (every tensor exact)."""
    converter = assets.fetch_llama_cpp() / "convert_hf_to_gguf.py"
    gguf_file = out / "model.gguf"
    run = subprocess.run([sys.executable, str(converter), str(export), "--outfile", str(gguf_file),
                          "--outtype", "f32"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return GGUFReader(gguf_file)


def export_tokenizer(export) -> data.Tokenizer:
    crlft = json.loads((export / "crlft.json").read_text())
    return data.Tokenizer(export / crlft["tokenizer_file"], crlft["template"])


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_the_gguf_carries_the_template_the_end_of_turn_every_new_token_and_the_weights(exports, kind, tmp_path):
    export = exports[kind]
    reader = convert(export, tmp_path)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    tokenizer = export_tokenizer(export)
    eot = tokenizer.eot_id
    assert field("tokenizer.chat_template") == json.loads((export / "tokenizer_config.json").read_text())[
        "chat_template"]
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == tokenizer.vocab_size and field("tokenizer.ggml.eos_token_id") == eot
    new = {text: i for text, i in tokenizer.special_ids.items() if i >= tokenizer.base_vocab_size}
    assert tokenizer.template.eot in new and len(new) == {"sentencepiece": 1, "tokenizer.json": 3}[kind]
    # A control token is one token wherever its text appears in a prompt llama.cpp tokenizes with its special
    # tokens parsed (the chat path does).
    assert {i: (tokens[i], types[i]) for i in new.values()} == {i: (t, TokenType.CONTROL) for t, i in new.items()}

    model = load_pretrained(export)
    ours = model.state_dict()
    heads = {"q_proj": model.config.n_heads, "k_proj": model.config.n_kv_heads}
    theirs = {}
    for t in reader.tensors:
        name = assets.gguf_to_our_name(t.name)
        value = torch.from_numpy(t.data.copy())
        if name.split(".")[-2] in heads:  # the converter interleaves each head's rotary halves
            value = assets.unpermute_rope(value, heads[name.split(".")[-2]])
        theirs[name] = value
    assert sorted(theirs) == sorted(ours)
    for name, value in theirs.items():
        assert torch.equal(value, ours[name].float()), name


def render_go_template(template: str, messages: list[dict]) -> str:
    """Go's text/template as ollama runs a Modelfile's TEMPLATE with .Messages (ollama's template.Execute), for
    the actions data.modelfile writes: range .Messages, if / else if eq .Role "…", else, end, .Content."""
    parts = re.split(r"{{ (.*?) }}", template)  # text, action, text, action, …

    def parse(i):  # → (nodes, next index, the else/end that closed them)
        nodes = []
        while i < len(parts):
            part, i = parts[i], i + 1
            if i % 2:  # text
                nodes.append(("text", part))
            elif part == "range .Messages":
                body, i, _ = parse(i)
                nodes.append(("range", body))
            elif part.startswith("if "):
                branches, condition = [], part[3:]
                while True:
                    body, i, closer = parse(i)
                    branches.append((condition, body))
                    if closer == "end":
                        break
                    condition = closer.removeprefix("else if ") if closer != "else" else None
                nodes.append(("if", branches))
            elif part in ("end", "else") or part.startswith("else if "):
                return nodes, i, part
            else:
                assert part == ".Content", part
                nodes.append(("content", None))
        return nodes, i, None

    def render(nodes, message=None):
        out = ""
        for kind, value in nodes:
            if kind == "text":
                out += value
            elif kind == "content":
                out += message["content"]
            elif kind == "range":
                out += "".join(render(value, m) for m in messages)
            else:
                role = lambda condition: re.fullmatch(r'eq \.Role "(\w+)"', condition)[1]  # noqa: E731
                body = next(b for c, b in value if c is None or message["role"] == role(c))
                out += render(body, message)
        return out

    return render(parse(0)[0])


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_the_modelfile_prompts_as_the_jinja_template_and_stops_at_the_end_of_turn(exports, kind):
    export = exports[kind]
    tokenizer = export_tokenizer(export)
    config = json.loads((export / "tokenizer_config.json").read_text())
    bos = config.get("bos_token") or ""
    modelfile = (export / "Modelfile").read_text()
    [template] = re.findall(r'^TEMPLATE """(.*?)"""$', modelfile, re.M | re.S)
    assert re.findall(r"^(FROM|PARAMETER) (.*)$", modelfile, re.M) == [
        ("FROM", "./model.gguf"), ("PARAMETER", f'stop "{tokenizer.template.eot}"')]
    for messages in (CONVERSATION, CONVERSATION[1:2]):
        jinja = jinja2.Template(config["chat_template"]).render(messages=messages, bos_token=bos,
                                                                add_generation_prompt=True)
        assert bos + render_go_template(template, messages) == jinja  # ollama adds the BOS itself
    assert "GPT4" in template and tokenizer.template.eot in template
    card = (export / "README.md").read_text()  # how each runtime is to prompt it
    assert "--jinja" in card and "Modelfile" in card and "'GPT4'" in card


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_a_runtime_that_tokenizes_the_rendered_template_whole_gets_the_training_ids(exports, kind):
    """transformers, like llama.cpp (LLAMA_CPP.md) and ollama, tokenizes the rendered template whole; data.py
    tokenizes role prefixes and messages apart, as the reference trainer does. With the demo's SentencePiece the
    ids are the same. With SmolLM2's tokenizer.json (GPT-2's pre-tokenizer, which splits the last newline of a
    run off when a letter follows), the 3.6 header's "\\n\\n" before a message's text is Ċ Ċ whole and ĊĊ apart;
    the generation prompt ends the text and keeps ĊĊ, as training has it before every answer. Nothing else
    differs. (Llama-3's own pre-tokenizer keeps ĊĊ either way: tests/test_bases.py.)"""
    from transformers import AutoTokenizer
    export = exports[kind]
    tokenizer = export_tokenizer(export)
    messages = [Message(m["role"], m["content"]) for m in CONVERSATION[1:]]
    ours, _ = data.tokenize_conversation(tokenizer, messages, "GPT4", CONVERSATION[0]["content"], inference=True)
    theirs = AutoTokenizer.from_pretrained(export).apply_chat_template(CONVERSATION, add_generation_prompt=True)
    expected = ours
    if kind == "tokenizer.json":
        [[apart], [newline]] = tokenizer.encode(["\n\n", "\n"])
        header_end = tokenizer.special_ids["<|end_header_id|>"]
        expected = [t for i, t in enumerate(ours) for t in (
            [newline, newline] if t == apart and ours[i - 1] == header_end and i + 1 < len(ours) else [t])]
        assert len(expected) == len(ours) + 4  # the system's header and three messages'
    assert theirs["input_ids"] == expected
