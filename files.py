"""Files written whole or not at all, and JSON read with the file named in its errors. Every stage
writes through these: a crash, a full disk or Ctrl-C leaves the previous file or folder, never half
of a new one."""

import json
import os
import shutil
from pathlib import Path


def write_atomically(path: Path, write):
    """write(tmp) fills a temporary file beside path, which then replaces path."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_text(path: Path, text: str):
    write_atomically(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: {e.msg}") from None


def write_directory(target: Path, fill):
    """fill(tmp) writes a whole folder beside target, which then takes target's place; if fill fails
    (a full disk, Ctrl-C), the temporary folder goes and target is untouched."""
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(new: Path, target: Path):
    """A complete folder `new` takes target's place: an old target is moved aside first and removed
    after, so a crash in between leaves one of the two whole."""
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)
