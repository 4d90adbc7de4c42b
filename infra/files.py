"""Files written whole or not at all, outputs checked before the work that fills them, a failed
write said in one line that names the file, and JSON read with the file named in its errors. Every
stage writes through these: a crash, a full disk or Ctrl-C leaves the previous file or folder,
never half of a new one."""

import errno
import json
import os
import re
import resource
import shutil
from pathlib import Path


class WriteFailed(OSError):
    """A write that failed, as one line: the file, and why in words ("no space left on the
    device")."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"writing {path} failed: {reason}")
        self.path = Path(path)
        self.reason = reason


def write_failed(path: Path, e: BaseException) -> WriteFailed | None:
    """Returns the WriteFailed for an exception raised while writing `path`, None if it is no write
    error. Libraries that wrap the OS's error in their own (safetensors: "(os error 28)") are read
    too."""
    if isinstance(e, WriteFailed):
        return e
    code = e.errno if isinstance(e, OSError) else None
    if code is None and (found := re.search(r"os error (\d+)", str(e))):
        code = int(found[1])
    if code is None and not isinstance(e, OSError):
        return None
    reasons = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is full",
               errno.EFBIG: "the file passed the limit on a file's size (ulimit -f)"}
    reason = reasons.get(code) or (short_write_reason(path) if code is None else None)
    return WriteFailed(path, reason or getattr(e, "strerror", None) or str(e))


def short_write_reason(path: Path) -> str | None:
    """Guesses why a write stopped short when the library that wrote says only that it did (numpy,
    torch.save): a disk with (almost) no room left, or a limit on a file's size."""
    folder = next((p for p in Path(path).absolute().parents if p.exists()), Path("/"))
    if shutil.disk_usage(folder).free < 2**20:
        return "no space left on the device"
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return "the file passed the limit on a file's size (ulimit -f)"
    return None


def check_output(path: Path, overwrite: bool = False) -> Path:
    """Checks an output file before the work that fills it: its folder made if missing and writable,
    and a file already there refused unless overwrite."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: give the file to write")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: --overwrite replaces it, or give another file")
    check_writable_folder(path.parent)
    return path


def check_writable_folder(folder: Path):
    """Checks a folder that outputs will go into: made if missing, and a file can be created in it.
    """
    probe = Path(folder) / f".write-test-{os.getpid()}"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write into {folder}: {e.strerror or e}") from None


def write_atomically(path: Path, write):
    """Writes a file whole or not at all: write(tmp) fills a temporary file beside path, which then
    replaces path; a failed write leaves no temporary file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if failure := write_failed(path, e):
            raise failure from None
        raise


def write_text(path: Path, text: str):
    write_atomically(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_bytes(path: Path, data):
    """Writes a file of a folder being written whole (write_directory), its write errors as
    WriteFailed."""
    try:
        Path(path).write_bytes(data)
    except OSError as e:
        raise write_failed(path, e) from None


def read_json(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: {e.msg}") from None


def write_directory(target: Path, fill):
    """Writes a folder whole or not at all: fill(tmp) writes it beside target, which then takes
    target's place; if fill fails (a full disk, Ctrl-C), the temporary folder goes and target is
    untouched. A failed write (WriteFailed: write_bytes, write_text) names the file as it would have
    been in target."""
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        replace_directory(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, WriteFailed) and e.path.is_relative_to(tmp):
            raise WriteFailed(target / e.path.relative_to(tmp), e.reason) from None
        raise


def replace_directory(new: Path, target: Path):
    """Puts a complete folder `new` in target's place: an old target is moved aside first and
    removed after, so a crash in between leaves one of the two whole."""
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)
