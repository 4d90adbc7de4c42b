"""data.py against the published token ids, an independent rendering of the template with SentencePiece
itself, the real ShareGPT file, and the invariants of multipack."""

import json
import re
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import sentencepiece as spm

from conftest import MISTRAL_TOKENIZER, ROOT
from data import (TEMPLATES, BadInput, Message, PrepareConfig, ShowConfig, Source, TokenizerConfig, Tokenizer,
                  expert_condition, load_meta, load_split, multipack, pack_stream, packing_efficiency, parse_record,
                  prepare, prepare_text, read_records, show_weights, tokenize_conversation, train_tokenizer)
from demo import DemoConfig, config_of, draw_prompts, make_demo, write_conversations

SP = spm.SentencePieceProcessor(model_file=str(MISTRAL_TOKENIZER))
EOT = 32000

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
    segments = np.split(np.array(PUBLISHED_IDS[1:]), np.flatnonzero(np.array(PUBLISHED_IDS[1:]) == EOT) + 1)
    for segment in segments[:-1]:
        weights += [0.0] * 5 + [0.5] * (len(segment) - 5)
    return weights


def render(sp, system, turns, condition, class_weight, eot=EOT):
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
    return [(split.tokens[o:o + n].tolist(), split.weights[o:o + n].tolist())
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
    # METHOD.md §3's check of the v3.2 template, with the Mistral vocabulary ("4" is 28781, "Hello" 22557).
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
    meta, split = prepare_files(tmp_path, [f"GPT4:1.0:{path}"], zero_refusals=True)
    assert meta["modified"]["refusals_zeroed"] == 2
    assert meta["dropped"]["no_supervised_token"] == 1  # the first: nothing left to learn
    third = rows(split)[1]
    assert sum(third[1]) == len(SP.encode("Sure.")) + 1  # only the first answer of the third counts


def test_leading_assistant_turns_are_removed_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [sharegpt(("gpt", "...continued"), ("human", "Q"), ("gpt", "A")),
                                                 sharegpt(("gpt", "orphan answer"))])
    meta, split = prepare_files(tmp_path, [f"GPT4:1.0:{path}"])
    assert meta["modified"]["leading_assistant_turns_removed"] == 2
    assert meta["dropped"]["no_supervised_token"] == 1  # the second had nothing else
    assert rows(split)[0][0] == render(SP, None, [("user", "Q", None), ("assistant", "A", None)], "GPT4", 1.0)[0]


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
# Bad input: named by file and line, or skipped and counted


GOOD = json.dumps(sharegpt(("human", "Q"), ("gpt", "A"))).encode()
BAD_LINES = {
    "malformed_json": b'{"conversations": [}',
    "missing_field": b'{"conversations": [{"from": "human"}]}',
    "wrong_type": b'{"conversations": [{"from": "human", "value": 5}]}',
    "unknown_role": b'{"conversations": [{"from": "robot", "value": "beep"}]}',
    "empty_conversation": b'{"conversations": []}',
    "empty_message": b'{"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "A"}]}',
    "invalid_utf8": b'{"conversations": [{"from": "human", "value": "caf\xe9"}, {"from": "gpt", "value": "A"}]}',
    "bad_weight": b'{"items": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "weight": -1}]}',
    "bad_weight (non-finite)": b'{"items": [{"role": "assistant", "content": "A", "weight": NaN}]}',
    "too_long": json.dumps(sharegpt(("human", "Q " * 100), ("gpt", "A"))).encode(),
    "wrong_type (not an object)": b'[1, 2]',
    "wrong_type (weight)": b'{"items": [{"role": "assistant", "content": "A", "weight": "0.5"}]}',
    "missing_field (neither format)": b'{"messages": []}',
    "invalid_utf8 (system)": b'{"items": [{"role": "assistant", "content": "A"}], "system": "\\udcff"}',
    "invalid_utf8 (condition)": b'{"items": [{"role": "assistant", "content": "A"}], "condition": "\\udcff"}',
    "malformed_json (nested 10,000 deep)": b"[" * 10_000 + b"]" * 10_000,
    "bad_weight (a 5,000-digit integer)": b'{"items": [{"role": "assistant", "content": "A", "weight": 1'
                                          + b"0" * 5000 + b"}]}",
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_bad_input_is_an_error_naming_file_and_line_or_is_skipped_and_counted(tmp_path, case):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(GOOD + b"\n" + BAD_LINES[case] + b"\n" + GOOD + b"\n")
    with pytest.raises(BadInput) as error:
        prepare_files(tmp_path, [f"GPT4:1.0:{path}"], max_len=64)
    assert str(error.value).startswith(f"{path}:2")
    assert not (tmp_path / "dataset").exists() and not list(tmp_path.glob("dataset.tmp*"))  # no partial output

    meta, split = prepare_files(tmp_path, [f"GPT4:1.0:{path}"], max_len=64, skip_bad=True)
    reason = case.split()[0]
    assert meta["skipped_bad_input"] == {reason: 1}
    assert len(split.lengths) == 2 and meta["read"]["records"] == 3


def test_a_json_array_cut_off_mid_record_keeps_what_precedes_the_cut(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([sharegpt(("human", "Q1"), ("gpt", "A1")), sharegpt(("human", "Q2"), ("gpt", "A2"))],
                               indent=1)[:-40])
    with pytest.raises(BadInput, match=rf"{re.escape(str(path))}:\d+ \(record 1\): malformed JSON"):
        prepare_files(tmp_path, [f"GPT4:1.0:{path}"])
    meta, split = prepare_files(tmp_path, [f"GPT4:1.0:{path}"], skip_bad=True)
    assert meta["skipped_bad_input"] == {"malformed_json": 1} and len(split.lengths) == 1


RECORDS = [sharegpt(("human", "Q1"), ("gpt", "A1")), sharegpt(("human", "Q2"), ("gpt", "A2"))]
ARRAY = json.dumps(RECORDS, indent=1).encode()
# Files that cannot be read record by record: an error naming the file (and line), --skip-bad or not.
UNREADABLE = {
    "a syntax error in an array's record 1": (ARRAY.replace(b'"Q2"', b'"Q2" "x"'),
                                              r":\d+ \(record 1\): malformed JSON"),
    "text after the closing ]": (ARRAY + b"\ngarbage", r":\d+: text after the array's closing"),
    "a second array": (ARRAY + ARRAY, r"text after the array's closing"),
    "an array nested 10,000 deep": (b"[" + b"[" * 10_000 + b"]" * 10_000 + b"]",
                                    r"\(record 0\): JSON nested too deeply"),
    "an empty file": (b"", r"holds no records"),
    "an empty array": (b" [ ]\n", r"holds no records"),
    "blank lines only": (b"\n \n", r"holds no records"),
}


@pytest.mark.parametrize("case", UNREADABLE)
def test_a_file_that_cannot_be_read_record_by_record_is_an_error_even_with_skip_bad(tmp_path, case):
    content, message = UNREADABLE[case]
    path = tmp_path / "chat.json"
    path.write_bytes(content)
    for skip_bad in (False, True):
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
            prepare_files(tmp_path, [f"GPT4:1.0:{path}"], skip_bad=skip_bad)
        assert not list(tmp_path.glob("dataset*"))


@pytest.mark.parametrize("name, content", [("chat.json", ARRAY), ("chat.jsonl", b"\n".join(map(str.encode, map(
    json.dumps, RECORDS))))])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + content)
    meta, split = prepare_files(tmp_path, [f"GPT4:1.0:{path}"])
    assert meta["read"]["records"] == 2 and len(split.lengths) == 2


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
    assert "File too large" in run.stderr
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


def test_the_command_line_reports_bad_input_and_fails(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(GOOD + b"\n" + BAD_LINES["unknown_role"] + b"\n")
    run = subprocess.run([sys.executable, str(ROOT / "data.py"), "prepare", f"--source=GPT4:1.0:{path}",
                          f"--tokenizer={MISTRAL_TOKENIZER}", f"--out={tmp_path / 'out'}"],
                         capture_output=True, text=True)
    assert run.returncode == 1 and f"error: {path}:2: message 0: unknown role 'robot'" in run.stderr
    assert not (tmp_path / "out").exists()
    help_run = subprocess.run([sys.executable, str(ROOT / "data.py"), "prepare", "--help"], capture_output=True,
                              text=True)
    assert help_run.returncode == 0 and "--skip-bad" in help_run.stdout and "--holdout" in help_run.stdout


# ---------------------------------------------------------------------------------------------------------
# The real ShareGPT file


def test_the_real_sharegpt_file_yields_every_complete_record(sharegpt_file):
    records = list(read_records(sharegpt_file))
    complete = [r for r, _ in records if not isinstance(r, BadInput)]
    assert len(complete) == 17671 and len(records) == 17672  # ASSETS.md: cut off after 17,671 records
    assert isinstance(records[-1][0], BadInput) and records[-1][0].reason == "malformed_json"
    assert sum(not r["conversations"] for r in complete) == 126
    roles = Counter(m["from"] for r in complete for m in r["conversations"])
    assert set(roles) == {"human", "gpt", "system", "chatgpt", "bing", "bard", "user"}


def test_real_sharegpt_conversations_tokenize_as_the_template_written_out(tmp_path, sharegpt_file):
    records = [r for r, _ in read_records(sharegpt_file) if not isinstance(r, BadInput)]
    clean = [r for r in records[:400] if r["conversations"] and r["conversations"][0]["from"] == "human"
             and all(m["value"].strip() and m["from"] in ("human", "gpt") for m in r["conversations"])][:150]
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
    assert stream["weights"].tolist() == sum((conversations[i][1] for i in chosen), [])
    assert stream["cu_seqlens"].tolist() == np.cumsum([0] + [len(conversations[i][0]) for i in chosen]).tolist()
    assert stream["positions"].tolist() == sum((list(range(len(conversations[i][0]))) for i in chosen), [])
    for i, (a, b) in zip(chosen, zip(stream["cu_seqlens"][:-1], stream["cu_seqlens"][1:])):
        ids = conversations[i][0]
        assert stream["targets"][a:b - 1].tolist() == ids[1:]  # each token predicts the next of its own
        assert stream["weights"][b - 1] == 0


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


# ---------------------------------------------------------------------------------------------------------
# Tokenizer training and the demo data


def test_tokenizer_training_learns_the_role_prefixes(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [sharegpt(("human", f"Sort these numbers: {i}, {i * 7}"),
                                                         ("gpt", f"{i}, {i * 7}")) for i in range(300)])
    train_tokenizer(TokenizerConfig(corpus=[str(corpus)], vocab_size=340, conditions=["GPT4"],
                                    out=str(tmp_path / "t.model")))
    tokenizer = Tokenizer(tmp_path / "t.model", "openchat_v3.2")
    assert tokenizer.vocab_size == 341 and tokenizer.eot_id == 340
    pieces = [tokenizer.backend.sp.id_to_piece(i) for i in tokenizer.prefix_ids("assistant", "GPT4")]
    assert "▁Assistant" in pieces and not any(p.startswith("<0x") for p in pieces)
    vocabulary = [tokenizer.backend.sp.id_to_piece(i) for i in range(tokenizer.base_vocab_size)]
    assert not any(re.search(r"\d\d", p) for p in vocabulary if not p.startswith("<0x"))  # digits split


def test_a_tokenizer_that_already_has_the_special_token_is_refused(tmp_path):
    import io
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 50), model_writer=model, vocab_size=12,
                                   user_defined_symbols=["<|end_of_turn|>"], minloglevel=2)
    (tmp_path / "t.model").write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="already has a piece <\\|end_of_turn\\|>"):
        Tokenizer(tmp_path / "t.model", "openchat_v3.2")


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
            np.testing.assert_array_equal(part.weights[offset:offset + length], [1.0] * (length - 1) + [0.0])
    corpus = tmp_path / "corpus.jsonl"
    for records, message in (([{"text": "fine"}, {"txt": "x"}], "corpus.jsonl:2: the record has no 'text'"),
                             ([{"text": "word " * 300}], "corpus.jsonl:1: .* tokens, longer than max_len=256")):
        write_jsonl(corpus, records)
        with pytest.raises(BadInput, match=message):
            prepare_text(corpus, demo_dir / "tokenizer.model", tmp_path / "out", max_len=256)


def test_tokenizer_pieces_never_join_a_number_to_punctuation_or_letters(tmp_path):
    """Numbers that end sentences ("is 12.") or touch letters ("GPT4") are frequent enough here for BPE to
    merge them; with split_digits off, numbers still stay pieces of their own."""
    rng = np.random.default_rng(0)
    texts = [f"The smallest is {rng.integers(100)}. After {rng.integers(100)}, GPT{rng.integers(5)}: "
             f"x{rng.integers(9)}." for _ in range(3000)]
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    train_tokenizer(TokenizerConfig(text=[str(corpus)], vocab_size=420, split_digits=False,
                                    out=str(tmp_path / "t.model")))
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
