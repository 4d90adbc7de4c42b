"""Every entry point's answer to a user's mistake is one `error:` line that says what is wrong (and
what to do), never a traceback; nothing is reported as success that is not; an output is checked
before the work that fills it, a generation stopped midway keeps what it finished, and a full disk
is one line naming the file, with nothing half-written left behind."""

import importlib
import json
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from conftest import MISTRAL_TOKENIZER, ROOT

PYTHON = sys.executable


def command(script, *argv, cwd=ROOT, **options):
    """`python SCRIPT ARGV` for a stage, `python -m tools.NAME ARGV` for a tool (tools/NAME.py)."""
    program = ["-m", script.removesuffix(".py").replace("/", ".")] if script.startswith("tools/") else [
        str(ROOT / script)]
    return subprocess.run([PYTHON, *program, *map(str, argv)], capture_output=True, text=True, cwd=cwd,
                          timeout=300, **options)


@pytest.fixture
def here(capsys, monkeypatch):
    """Like `command`, in this process, with no start-up of Python and torch to wait for: what the
    program's entry prints and the status it exits with."""
    def call(script, *argv, cwd=None):
        from infra import cli
        module = importlib.import_module(script.removesuffix(".py"))
        argv = list(map(str, argv))
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:  # each program's `if __name__ == "__main__":` line
            if script == "train.py":
                status = module.main(argv)
            elif script == "sample.py":
                status = cli.run_command(module.SampleConfig, module.run, argv, module.__doc__)
            else:
                status = cli.run_commands(module.COMMANDS, argv, module.__doc__)
        except SystemExit as e:
            status = e.code
        return subprocess.CompletedProcess(argv, status or 0, "", capsys.readouterr().err)
    return call


def one_error_line(result, message: str):
    """Exit status 1, no traceback, and the last line of stderr the error with `message` in it."""
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last


@pytest.fixture(scope="module")
def export(dataset, tmp_path_factory):
    """A tiny model trained for two steps: what sample.py and eval.py are pointed at."""
    out = tmp_path_factory.mktemp("entry") / "run"
    result = command("train.py", f"--data={dataset}", "--base=", f"--out={out}", "--model=tiny",
                     "--batch-max-len=512", "--max-steps=2", "--export-dtype=float32")
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "exports" / "step-2"


def sharegpt_lines(n=3) -> str:
    return "".join(json.dumps({"conversations": [{"from": "human", "value": f"Q{i}"},
                                                 {"from": "gpt", "value": f"A{i}"}]}) + "\n"
                   for i in range(n))


def prepare(tmp_path, *argv):
    return command("data.py", "prepare", f"--tokenizer={MISTRAL_TOKENIZER}", f"--out={tmp_path / 'out'}",
                   *argv)


# ---------------------------------------------------------------------------------------------------------
# data.py: files that are not what they seem, and a prepare that would write nothing to train on


def test_a_file_in_another_encoding_is_named_with_its_encoding(tmp_path):
    for encoding, named in (("utf-16", "is UTF-16 text"), ("utf-32", "is UTF-32 text"),
                            ("utf-16-le", "holds NUL bytes")):
        path = tmp_path / f"chats-{encoding}.jsonl"
        path.write_bytes(sharegpt_lines().encode(encoding))
        one_error_line(prepare(tmp_path, f"--source=GPT4:1.0:{path}", "--skip-bad"), named)
    assert not (tmp_path / "out").exists()


def test_a_json_object_over_several_lines_is_named_as_such(tmp_path):
    path = tmp_path / "chats.json"
    path.write_text(json.dumps({"data": [json.loads(line) for line in sharegpt_lines(2).splitlines()]},
                               indent=2))
    one_error_line(prepare(tmp_path, f"--source=GPT4:1.0:{path}", "--skip-bad"),
                   "holds one JSON object over several lines, not records")


@pytest.mark.parametrize("case", ["every record bad", "a class weight of 0", "all held out"])
def test_a_prepare_that_would_write_nothing_to_train_on_fails_with_the_counts(tmp_path, case):
    path = tmp_path / "chats.jsonl"
    path.write_text('{"conversations": [}\n' * 3 if case == "every record bad" else sharegpt_lines(2))
    weight, holdout = ("0", "0") if case == "a class weight of 0" else ("1.0", "0")
    if case == "all held out":
        holdout = "0.99"
    result = prepare(tmp_path, f"--source=GPT4:{weight}:{path}", "--skip-bad", f"--holdout={holdout}")
    one_error_line(result, "no conversation left to train on, nothing written: read ")
    counts = {"every record bad": "'malformed_json': 3", "a class weight of 0": "'no_supervised_token': 2",
              "all held out": "2 kept, 2 held out (--holdout=0.99)"}
    assert counts[case] in result.stderr
    assert not (tmp_path / "out").exists()


def test_turns_that_do_not_alternate_are_kept_and_counted_and_invisible_answers_refused(tmp_path):
    """As the reference trainer does, turns are written in the order given; meta.json counts the
    conversations whose turns do not alternate. An answer with nothing visible (a zero-width space)
    is an empty message, skipped and counted under --skip-bad."""
    records = [{"conversations": [{"from": "human", "value": "Q"}, {"from": "human", "value": "Q2"},
                                  {"from": "gpt", "value": "A"}, {"from": "gpt", "value": "A2"}]},
               {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "\u200b"}]},
               {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    one_error_line(prepare(tmp_path, f"--source=GPT4:1.0:{path}"), ":2: message 1 has no visible character")
    result = prepare(tmp_path, f"--source=GPT4:1.0:{path}", "--skip-bad")
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["noted"] == {"turns_not_alternating": 1} and meta["skipped_bad_input"] == {"empty_message": 1}
    assert meta["read"]["records"] == 3 and meta["splits"]["train"]["conversations"] == 2


def test_outputs_are_checked_before_the_work(tmp_path):
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "chats.jsonl"
    path.write_text(sharegpt_lines())
    result = command("data.py", "prepare", f"--source=GPT4:1.0:{path}", f"--tokenizer={MISTRAL_TOKENIZER}",
                     f"--out={tmp_path / 'a-file' / 'dataset'}")
    one_error_line(result, f"cannot write into {tmp_path / 'a-file'}")
    assert "tokenizing" not in result.stderr  # refused before any work
    one_error_line(command("data.py", "show", cwd=tmp_path),
                   "data/demo/dataset/meta.json is missing: is data/demo/dataset a dataset")
    dataset = tmp_path / "dataset"
    made = [f"--source=GPT4:1.0:{path}", f"--tokenizer={MISTRAL_TOKENIZER}", f"--out={dataset}"]
    assert command("data.py", "prepare", *made).returncode == 0
    before = (dataset / "meta.json").read_text()
    path.write_text(sharegpt_lines(5))
    one_error_line(command("data.py", "prepare", *made), f"{dataset} exists: --overwrite replaces it")
    assert (dataset / "meta.json").read_text() == before
    assert command("data.py", "prepare", *made, "--overwrite").returncode == 0
    assert json.loads((dataset / "meta.json").read_text())["splits"]["train"]["conversations"] == 5


# ---------------------------------------------------------------------------------------------------------
# train.py: flags, and what is missing


@pytest.mark.parametrize("flag, message", [
    ("--epochs=-1", "--epochs=-1 is out of range: passes over the data"),
    ("--lr=nan", "--lr=nan is out of range: peak learning rate"),
    ("--batch-max-len=0", "--batch-max-len=0 is out of range"),
    ("--dtype=float8", "--dtype=float8 is out of range"),
    ("--model=Llama-9B", "--model=Llama-9B is out of range")])
def test_a_flag_no_run_can_use_is_named_before_anything_starts(tmp_path, here, flag, message):
    one_error_line(here("train.py", flag, cwd=tmp_path), message)


# ---------------------------------------------------------------------------------------------------------
# sample.py and eval.py: the server, the checkpoint, the prompts, the outputs


@pytest.mark.slow
def test_the_server_that_cannot_listen_says_why(export, here):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_error_line(command("sample.py", f"--checkpoint={export}", "--serve", f"--port={port}"),
                       f"cannot serve on 127.0.0.1:{port}: [Errno 98] Address already in use")
    one_error_line(here("sample.py", f"--checkpoint={export}", "--serve", "--port=70000"),
                   "--port=70000 is out of range")
    one_error_line(command("sample.py", f"--checkpoint={export}", "--serve", "--host=no-such-host.invalid"),
                   "cannot serve on no-such-host.invalid:8000")


@pytest.mark.slow
def test_a_truncated_safetensors_file_is_named_as_such(export, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(export, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    message = f"{weights} is not a whole safetensors file"
    one_error_line(command("sample.py", f"--checkpoint={broken}", "--prompt=hi"), message)
    one_error_line(command("eval.py", "demo", f"--checkpoint={broken}"), message)


def test_a_prompts_file_with_a_record_that_is_not_a_prompt_names_its_line(export, tmp_path, here):
    prompts, answers = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    for lines, message in ((['{"prompt": "hi"}', '{"prompt": 5}'], "prompts.jsonl:2: 'prompt' is int, not a string"),
                           (['{"prompt": "hi"}', '{"prompt": '], "prompts.jsonl:2: malformed JSON"),
                           (['["hi"]'], "prompts.jsonl:1: a record is a JSON object, not list"),
                           (['{"text": "hi"}'], "prompts.jsonl:1: the record has neither 'prompt' nor 'messages'")):
        prompts.write_text("\n".join(lines) + "\n")
        one_error_line(here("sample.py", f"--checkpoint={export}", f"--input={prompts}", f"--output={answers}"),
                       message)
    assert not answers.exists()


def test_an_output_is_checked_first_and_made_where_its_folder_is_missing(export, tmp_path, here):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Sort these numbers from smallest to largest: 3 1 2"}\n')
    taken = tmp_path / "answers.jsonl"
    taken.write_text("keep me\n")
    one_error_line(here("sample.py", f"--checkpoint={export}", f"--input={prompts}", f"--output={taken}"),
                   f"{taken} exists: --overwrite replaces it")
    assert taken.read_text() == "keep me\n"
    (tmp_path / "a-file").write_text("")
    one_error_line(here("sample.py", f"--checkpoint={export}", f"--input={prompts}",
                           f"--output={tmp_path / 'a-file' / 'answers.jsonl'}"), "cannot write into")
    fresh = tmp_path / "new" / "folder" / "answers.jsonl"
    assert here("sample.py", f"--checkpoint={export}", f"--input={prompts}", f"--output={fresh}").returncode == 0
    assert json.loads(fresh.read_text())["answer"] is not None
    assert here("sample.py", f"--checkpoint={export}", f"--input={prompts}", f"--output={taken}",
                   "--overwrite").returncode == 0 and taken.read_text() != "keep me\n"
    one_error_line(here("eval.py", "mtbench", f"--checkpoint={export}", f"--questions={prompts}",
                           f"--output={taken}"), f"{taken} exists: --overwrite replaces it")


def test_sample_refuses_a_dataset_of_another_tokenizer_as_eval_does(export, tmp_path, here):
    other = tmp_path / "other"
    path = tmp_path / "chats.jsonl"
    path.write_text(sharegpt_lines())
    assert command("data.py", "prepare", f"--source=GPT4:1.0:{path}", f"--tokenizer={MISTRAL_TOKENIZER}",
                   f"--out={other}").returncode == 0
    one_error_line(here("sample.py", f"--checkpoint={export}", f"--data={other}", "--prompt=hi"),
                   f"{other} was made with another tokenizer than")


@pytest.mark.slow
def test_ctrl_c_in_a_file_of_prompts_keeps_the_answers_finished(export, tmp_path):
    prompts, answers = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Sort these numbers: {i} {i + 3} 1"}) + "\n"
                               for i in range(3000)))
    process = subprocess.Popen([PYTHON, str(ROOT / "sample.py"), f"--checkpoint={export}", f"--input={prompts}",
                                f"--output={answers}", "--batch-size=1", "--max-new-tokens=4"], cwd=ROOT,
                               stderr=subprocess.PIPE, text=True,
                               # A suite run in a shell's background inherits SIGINT ignored: undone here.
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while "prompts: " not in process.stderr.readline():  # the first progress line
        assert process.poll() is None
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130 and "Traceback" not in stderr
    finished = [json.loads(line) for line in answers.read_text().splitlines()]
    assert 0 < len(finished) < 3000 and f"wrote the {len(finished)} answers finished, of 3000 prompts" in stderr
    assert [r["prompt"] for r in finished] == [f"Sort these numbers: {i} {i + 3} 1" for i in range(len(finished))]


@pytest.mark.parametrize("fault", [RuntimeError("the device went away"), KeyboardInterrupt()])
def test_mt_bench_answers_finished_before_a_failure_are_written(export, tmp_path, monkeypatch, capsys, here,
                                                                fault):
    import eval as evaluation
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "turns": [f"Q{i}", f"And {i}?"]}) + "\n"
                                 for i in range(20)))
    calls = []
    generate = evaluation.Generator.generate

    def failing(self, *args, **kwargs):  # the second batch of questions fails: a fault midway
        calls.append(1)
        if len(calls) == 3:  # two calls a batch: its first turns, then its second
            raise fault
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(evaluation.Generator, "generate", failing)
    out = tmp_path / "answers" / "model.jsonl"  # a folder not there yet: made
    argv = ["mtbench", f"--checkpoint={export}", f"--questions={questions}", f"--output={out}",
            "--max-new-tokens=4"]
    if isinstance(fault, KeyboardInterrupt):  # Ctrl-C: exit status 130, no traceback
        result = here("eval.py", *argv)
        assert result.returncode == 130 and result.stderr.strip().endswith("interrupted")
        stderr = result.stderr
    else:  # not the user's mistake: the traceback is kept
        with pytest.raises(RuntimeError, match="the device went away"):
            here("eval.py", *argv)
        stderr = capsys.readouterr().err
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question_id"] for a in written] == list(range(16))  # two batches of 16 turns, one done
    assert "wrote 16 answers of 20 questions" in stderr


# ---------------------------------------------------------------------------------------------------------
# demo.py, tools/ablation.py, tools/bench.py


@pytest.mark.slow
def test_the_other_programs_answer_a_mistake_in_one_line(tmp_path):
    one_error_line(command("demo.py", f"--out={tmp_path / 'demo'}", "--conversations=20", "--holdout-prompts=2",
                           "--validation-prompts=2", "--base-documents=5", "--vocab-size=100000"),
                   "training a SentencePiece model of 100000 pieces")
    one_error_line(command("tools/ablation.py", "--arm=nope"), "--arm=nope: unknown; arms: main")
    one_error_line(command("tools/bench.py", "loss", "--dtype=float8"), "--dtype=float8")


# ---------------------------------------------------------------------------------------------------------
# A full disk: a small filesystem where the test can make one (a user namespace and tmpfs), else a limit
# on the size of a file (the kernel's EFBIG at the write instead of ENOSPC)


def small_filesystem_available() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True).returncode == 0


def on_a_full_disk(folder, kilobytes: int, script, *argv):
    """(result, the reason the error line must give, the files left in `folder`) of `python script
    argv` with `folder` a filesystem of `kilobytes` (where none can be made: every file limited to
    that size)."""
    folder.mkdir(parents=True, exist_ok=True)
    if small_filesystem_available():
        line = " ".join(f"'{a}'" for a in [PYTHON, str(ROOT / script), *map(str, argv)])
        result = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={kilobytes}k tmpfs "
                                 f"'{folder}' && {line}; status=$?; echo; echo LEFT:; find '{folder}' -mindepth 1; "
                                 f"exit $status"], capture_output=True, text=True, cwd=ROOT, timeout=300)
        return result, "no space left on the device", result.stdout.split("LEFT:\n")[-1].split()

    def limit():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (kilobytes * 1024, kilobytes * 1024))
    result = command(script, *argv, preexec_fn=limit)
    return result, "the file passed the limit on a file's size (ulimit -f)", [str(p) for p in folder.rglob("*")]


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing_half_written(dataset, export, tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(sharegpt_lines(4000))
    disk = tmp_path / "disk"
    result, reason, left = on_a_full_disk(disk, 64, "data.py", "prepare", f"--source=GPT4:1.0:{path}",
                                          f"--tokenizer={MISTRAL_TOKENIZER}", f"--out={disk / 'dataset'}")
    one_error_line(result, f"writing {disk / 'dataset' / 'train' / 'tokens.npy'} failed: {reason}")
    assert left == []

    result, reason, left = on_a_full_disk(disk, 256, "train.py", f"--data={dataset}", "--base=",
                                          f"--out={disk / 'run'}", "--model=tiny", "--batch-max-len=512",
                                          "--max-steps=2")
    one_error_line(result, f"saving checkpoint {disk / 'run' / 'checkpoints' / 'step-00000002'} failed: "
                           f"{reason}; the previous checkpoints are intact")
    assert not [f for f in left if ".tmp" in f]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Sort: {i} 2"}) + "\n" for i in range(300)))
    result, reason, left = on_a_full_disk(disk / "answers", 8, "sample.py", f"--checkpoint={export}",
                                          f"--input={prompts}", f"--output={disk / 'answers' / 'a.jsonl'}",
                                          "--max-new-tokens=4")
    one_error_line(result, f"writing {disk / 'answers' / 'a.jsonl'} failed: {reason}")
    assert left == []
