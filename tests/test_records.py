"""records.py: users' files read record by record and checked, against hand-written good and bad
records, the real ShareGPT file, and every reason --skip-bad counts. (Generated files mixing good
and bad records: test_fuzz.py.)"""

import json
import re
import subprocess
import sys
from collections import Counter

import pytest

from conftest import MISTRAL_TOKENIZER, ROOT
from infra.records import BadInput, Source, parse_record, read_records
from test_data import RECORDS, prepare_files, render, rows, sharegpt, SP, write_jsonl


def test_leading_assistant_turns_are_removed_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [sharegpt(("gpt", "...continued"), ("human", "Q"), ("gpt", "A")),
                                                 sharegpt(("gpt", "orphan answer"))])
    meta, split = prepare_files(tmp_path, [f"GPT4:1.0:{path}"])
    assert meta["modified"]["leading_assistant_turns_removed"] == 2
    assert meta["dropped"]["no_supervised_token"] == 1  # the second had nothing else
    assert rows(split)[0][0] == render(SP, None, [("user", "Q", None), ("assistant", "A", None)], "GPT4", 1.0)[0]


GOOD = json.dumps(sharegpt(("human", "Q"), ("gpt", "A"))).encode()
OTHER = json.dumps(sharegpt(("human", "Q2"), ("gpt", "A2"))).encode()  # not a duplicate of GOOD


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
    path.write_bytes(GOOD + b"\n" + BAD_LINES[case] + b"\n" + OTHER + b"\n")
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


def test_the_real_sharegpt_file_yields_every_complete_record(sharegpt_file):
    records = list(read_records(sharegpt_file))
    complete = [r for r, _ in records if not isinstance(r, BadInput)]
    assert len(complete) == 17671 and len(records) == 17672  # ASSETS.md: cut off after 17,671 records
    assert isinstance(records[-1][0], BadInput) and records[-1][0].reason == "malformed_json"
    assert sum(not r["conversations"] for r in complete) == 126
    roles = Counter(m["from"] for r in complete for m in r["conversations"])
    assert set(roles) == {"human", "gpt", "system", "chatgpt", "bing", "bard", "user"}


def test_an_openchat_system_item_is_the_system_prompt_first_and_refused_anywhere_else(tmp_path):
    """A "system" item first is read as the record's system prompt (the same tokens as its "system"
    field); anywhere else, or beside a "system" field, it is refused naming the file, line and item, and
    --skip-bad counts it as misplaced, never as a leading assistant turn or a trained turn."""
    turns = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    system = {"role": "system", "content": "Be brief."}
    first = parse_record({"items": [system, *turns]}, Source("GPT4", 1.0, []), 0, "f:1")
    assert first.system == "Be brief." and [m.role for m in first.messages] == ["user", "assistant"]
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"items": [system, *turns]}, {"items": turns, "system": "Be brief."},
        {"items": [*turns, system, *turns]}, {"items": [system, *turns], "system": "Be kind."}])
    with pytest.raises(BadInput, match=rf"{re.escape(str(path))}:3: item 2: a system message must come "
                                       rf"first"):
        prepare_files(tmp_path, [f"GPT4:1.0:{path}"])
    # The two forms are one conversation: both kept (no deduplication) to compare their tokens.
    meta, split = prepare_files(tmp_path, [f"GPT4:1.0:{path}"], skip_bad=True, dedup=False)
    assert meta["skipped_bad_input"] == {"misplaced_system": 2}
    assert meta["modified"]["leading_assistant_turns_removed"] == 0
    expected, _ = render(SP, "Be brief.", [("user", "Q", None), ("assistant", "A", None)], "GPT4", 1.0)
    assert [ids for ids, _ in rows(split)] == [expected, expected]
    write_jsonl(path, [{"items": [system, *turns], "system": "Be kind."}])
    with pytest.raises(BadInput, match=r"chat.jsonl:1: item 0: a system item and a 'system' field"):
        prepare_files(tmp_path, [f"GPT4:1.0:{path}"], overwrite=True)
