"""demo.py: the demo's data is what it says (mixed quality, disjoint prompt sets, a base corpus of
true statements that never asks for the task), its variations add only the declared noise, its
tokenizer and base corpus are as described, and `python demo.py` makes each stage once, as a user
would, and ends with the fine-tuned model's scores."""

import json
import re
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import sentencepiece as spm

from conftest import ROOT
from data import Tokenizer, load_meta, load_split
from demo import (DemoConfig, config_of, draw_prompts, ensure_base, make_demo, prepare_text,
                  train_tokenizer, write_conversations)
from infra.records import BadInput
from test_data import sharegpt, write_jsonl


def test_tokenizer_training_learns_the_role_prefixes(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [sharegpt(("human", f"Sort these numbers: {i}, {i * 7}"),
                                                         ("gpt", f"{i}, {i * 7}")) for i in range(300)])
    train_tokenizer([corpus], [], 340, ["GPT4"], tmp_path / "t.model", split_digits=True)
    tokenizer = Tokenizer(tmp_path / "t.model", "openchat_v3.2")
    assert tokenizer.vocab_size == 341 and tokenizer.eot_id == 340
    pieces = [tokenizer.backend.sp.id_to_piece(i) for i in tokenizer.prefix_ids("assistant", "GPT4")]
    assert "▁Assistant" in pieces and not any(p.startswith("<0x") for p in pieces)
    vocabulary = [tokenizer.backend.sp.id_to_piece(i) for i in range(tokenizer.base_vocab_size)]
    assert not any(re.search(r"\d\d", p) for p in vocabulary if not p.startswith("<0x"))  # digits split


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    make_demo(DemoConfig(out=str(out), conversations=600, holdout_prompts=60, validation_prompts=40, base_documents=300,
                         vocab_size=420, seed=3))
    return out


def numbers_of(prompt):
    return [int(n) for n in prompt.split(": ", 1)[1].split()]


def conversations_of(folder):
    expert = json.loads((folder / "expert.json").read_text())
    suboptimal = [json.loads(line) for line in (folder / "suboptimal.jsonl").read_text().splitlines()]
    return [(kind, tuple(numbers_of(r["conversations"][0]["value"])), r["conversations"][1]["value"])
            for kind, records in (("expert", expert), ("suboptimal", suboptimal)) for r in records]


def test_the_demo_data_is_mixed_quality_with_disjoint_validation_and_held_out_prompts(demo_dir):
    conversations = conversations_of(demo_dir)
    holdout = [json.loads(line) for line in (demo_dir / "holdout.jsonl").read_text().splitlines()]
    validation = [json.loads(line) for line in (demo_dir / "validation.jsonl").read_text().splitlines()]
    assert Counter(kind for kind, _, _ in conversations) == {"expert": 60, "suboptimal": 540}
    assert (len(holdout), len(validation)) == (60, 40)

    def mixed(ns):
        return min(ns) < 10 <= max(ns)

    wrong = Counter()
    for kind, ns, answer in conversations:
        right = " ".join(map(str, sorted(ns)))
        if kind == "expert":
            assert answer == right
        else:  # the systematic error: text order, which is wrong only for mixed widths
            assert answer == " ".join(sorted(map(str, ns)))
            wrong[mixed(ns)] += answer != right
    assert wrong[False] == 0 and wrong[True] > 0.6 * sum(mixed(ns) for kind, ns, _ in conversations if kind != "expert")
    trained = {ns for _, ns, _ in conversations}
    held_out = {tuple(numbers_of(h["prompt"])) for h in holdout}
    validating = {tuple(numbers_of(v["prompt"])) for v in validation}
    assert not trained & held_out and not trained & validating and not held_out & validating
    for item in holdout + validation:
        ns = numbers_of(item["prompt"])
        assert item["answer"] == " ".join(map(str, sorted(ns))) and item["mixed"] == mixed(ns)
        assert item["suboptimal_answer"] == " ".join(sorted(map(str, ns)))
    meta = load_meta(demo_dir / "dataset")
    assert [s["condition"] for s in meta["sources"]] == ["GPT4", "GPT3"] and meta["template"] == "openchat_v3.2"
    assert meta["splits"]["train"]["conversations"] + meta["splits"]["holdout"]["conversations"] == 600


def test_the_demo_variations_keep_the_prompts_and_add_the_declared_noise(demo_dir, tmp_path):
    """random_errors swaps two neighbours of the right order in that share of sub-optimal answers;
    mislabelled files that share of each source under the other; the prompts stay those of the demo."""
    made = config_of(demo_dir)
    plain = conversations_of(demo_dir)
    for field, share in (("random_errors", 0.5), ("mislabelled", 0.2)):
        varied = replace(made, **{field: share})
        folder = tmp_path / field
        folder.mkdir()
        write_conversations(varied, draw_prompts(varied)[2], folder)
        noisy = conversations_of(folder)
        assert sorted(ns for _, ns, _ in noisy) == sorted(ns for _, ns, _ in plain)
        if field == "random_errors":
            assert [(k, ns) for k, ns, _ in noisy] == [(k, ns) for k, ns, _ in plain]
            slips = 0
            for (kind, ns, answer), (_, _, before) in zip(noisy, plain):
                got, right = answer.split(), [str(n) for n in sorted(ns)]
                if answer != before and len(set(ns)) > 1:
                    assert kind == "suboptimal"
                    i = next(i for i in range(len(got)) if got[i] != right[i])  # two neighbours swapped
                    assert got[:i] + [got[i + 1], got[i]] + got[i + 2:] == right
                    slips += 1
            assert 0.4 < slips / 540 < 0.6
        else:  # the answers are the source's; the file is the other source's for about 20% of them
            answers = {(ns, answer): kind for kind, ns, answer in plain}
            moved = [answers[(ns, answer)] != kind for kind, ns, answer in noisy]
            assert 0.15 < sum(moved) / len(moved) < 0.25


def test_the_base_corpus_is_true_statements_about_lists_and_never_the_task(demo_dir):
    """Every sentence of the base corpus, checked against its list by an independent reading; no sort
    prompt, no sorted list asked for, no role or condition of the chat template."""
    documents = [json.loads(line)["text"] for line in (demo_dir / "base_corpus.jsonl").read_text().splitlines()]
    assert len(documents) == 300
    kinds = Counter()
    for document in documents:
        assert not re.search(r"sort|order:|ascending|increasing|User|Assistant|GPT", document, re.IGNORECASE)
        for paragraph in document.split("Take the numbers ")[1:]:
            listed, *sentences = paragraph.strip().rstrip(".").split(". ")
            ns = [int(n) for n in listed.split()]
            text = sorted(ns, key=str)
            assert 2 <= len(ns) <= 7 and 4 <= len(sentences) <= 6
            for sentence in sentences:
                *words, last = sentence.split()
                if m := re.fullmatch(r"After (\d+) the next larger is (\d+)", sentence):
                    x, y = map(int, m.groups())
                    truth, kind = y == min(n for n in ns if n > x), "next larger"
                elif m := re.fullmatch(r"In dictionary order after (\d+) comes (\d+)", sentence):
                    x, y = m.groups()
                    truth, kind = y == min((str(n) for n in ns if str(n) > x)), "next as text"
                elif m := re.fullmatch(r"(In dictionary order of|Of) (\d+) and (\d+) the (?:first|smaller) is (\d+)",
                                       sentence):
                    _, a, b, y = m.groups()
                    as_text = m.group(1) != "Of"
                    truth = y == (min(a, b) if as_text else str(min(int(a), int(b))))
                    kind = "pair"
                elif sentence.startswith(("Reversed they read", "Without")):
                    got = [int(n) for n in sentence.split(" read ")[1].split()]
                    if sentence.startswith("Reversed"):
                        truth = got == ns[::-1]
                    else:
                        x = int(words[1])
                        truth = any(got == ns[:i] + ns[i + 1:] for i in range(len(ns)) if ns[i] == x)
                    kind = "copy"
                else:
                    kind = " ".join(words)
                    truth = {"The smallest is": min(ns), "The largest is": max(ns),
                             "In dictionary order the first is": text[0],
                             "In dictionary order the last is": text[-1]}[kind] == int(last)
                assert truth, f"false: {sentence!r} of {ns}"
                kinds[kind] += 1
    assert len(kinds) == 8 and min(kinds.values()) > 100


def test_prepare_text_weighs_every_token_of_a_document(demo_dir, tmp_path):
    meta = load_meta(demo_dir / "base-corpus")
    assert meta["template"] == "text" and meta["tokenizer"]["special_tokens"] == {}
    assert meta["tokenizer"]["vocab_size"] == meta["tokenizer"]["base_vocab_size"]
    documents = [json.loads(line)["text"] for line in (demo_dir / "base_corpus.jsonl").read_text().splitlines()]
    sp = spm.SentencePieceProcessor(model_file=str(demo_dir / "tokenizer.model"))
    split, held_out = load_split(demo_dir / "base-corpus", "train"), load_split(demo_dir / "base-corpus", "holdout")
    assert len(split.lengths) + len(held_out.lengths) == len(documents) and len(held_out.lengths) == 6
    expected = {tuple([sp.bos_id()] + ids + [sp.eos_id()]) for ids in sp.encode(documents)}
    for part in (split, held_out):
        for offset, length in zip(part.offsets, part.lengths):
            ids = tuple(part.tokens[offset:offset + length])
            assert ids in expected
            np.testing.assert_array_equal(part.target_weights[offset:offset + length], [1.0] * (length - 1) + [0.0])
    corpus = tmp_path / "corpus.jsonl"
    for records, message in (([{"text": "fine"}, {"txt": "x"}], "corpus.jsonl:2: the record has no 'text'"),
                             ([{"text": "word " * 300}], "corpus.jsonl:1: .* tokens, longer than max_len=256")):
        write_jsonl(corpus, records)
        with pytest.raises(BadInput, match=message):
            prepare_text(corpus, demo_dir / "tokenizer.model", tmp_path / "out", max_len=256)


def demo_config(tmp_path, **changes) -> DemoConfig:
    """A small demo with a tiny base, every file under tmp_path."""
    return replace(DemoConfig(out=str(tmp_path / "data"), base_out=str(tmp_path / "base"),
                              run_out=str(tmp_path / "run"), base_model="tiny", batch_max_len=1024,
                              conversations=240, holdout_prompts=10, validation_prompts=10,
                              base_documents=200, vocab_size=420, seed=2), **changes)


def flags(cfg: DemoConfig) -> list[str]:
    return [f"--{name.replace('_', '-')}={value}" for name, value in vars(cfg).items()]


@pytest.mark.slow
def test_python_demo_py_makes_each_stage_once_as_a_user_would_and_scores_the_model(tmp_path, capfd):
    """The data, then train.py as a plain language model (the base: its own vocabulary, no chat template,
    EOS as its end), then train.py's C-RLFT from it (the EOT row added), then eval.py, each command shown
    before it runs; run again, nothing is made twice; other demo settings make the data and base again."""
    cfg = demo_config(tmp_path)
    first = subprocess.run([sys.executable, str(ROOT / "demo.py"), *flags(cfg)], capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"$ python train.py --data={cfg.out}/base-corpus --base= --out={cfg.base_out}" in first.stdout
    assert f"$ python train.py --data={cfg.out}/dataset --base={cfg.base_out}/exports/epoch-1" in first.stdout
    assert "$ python eval.py demo --checkpoint=" in first.stdout
    assert re.search(r"\| GPT4 \| 10 \| [\d.]+% \|", first.stdout)
    assert re.search(r"\| GPT3 \| 10 \| [\d.]+% \|", first.stdout)
    base = tmp_path / "base" / "exports" / "epoch-1"
    config = json.loads((base / "config.json").read_text())
    assert (config["vocab_size"], config["eos_token_id"]) == (420, 2)
    assert "chat_template" not in json.loads((base / "tokenizer_config.json").read_text())
    tuned = json.loads((tmp_path / "run" / "exports" / "epoch-5" / "config.json").read_text())
    assert tuned["vocab_size"] == 421 and tuned["eos_token_id"] == 420  # <|end_of_turn|> appended

    made = (base / "model.safetensors").stat().st_mtime_ns
    again = subprocess.run([sys.executable, str(ROOT / "demo.py"), *flags(cfg)], capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("already done") == 2
    assert "$ python train.py" not in again.stdout and "$ python eval.py demo" in again.stdout
    assert (base / "model.safetensors").stat().st_mtime_ns == made
    assert ensure_base(cfg) == base and "already done" in capfd.readouterr().out
    ensure_base(replace(cfg, seed=3))  # other demo data: the data and the base made again
    out = capfd.readouterr().out
    assert "making the demo data" in out and f"$ python train.py --data={cfg.out}/base-corpus" in out
