"""Command lines from config dataclasses: every field is a `--key=value` flag, `--help` lists them
all, a value out of range is refused naming its flag; a user's mistake is one `error:` line; long
work prints its progress.

    @dataclass
    class Config:
        steps: int = arg(100, "optimizer steps")
        files: list[str] = arg([], "input files (repeat the flag)")

    cfg = parse(Config, sys.argv[1:], "what the program does")
"""

import argparse
import dataclasses
import signal
import sys
import time
import typing
from pathlib import Path


def arg(default, help: str):
    """Declares a config field with its default and a one-line meaning for --help."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (its examples one per line), each option with its default."""


def parse(cls, argv, description: str = "", defaults=None):
    """Parses argv into an instance of the dataclass cls (flags --key=value, --key value, or --flag
    for a bool); unset flags take their values from `defaults` (an instance of cls) or else the
    field defaults."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, type(int | None)):  # X | None: parse as X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        # --max-len or --max_len
        flags = dict.fromkeys(["--" + f.name.replace("_", "-"), "--" + f.name])
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(*flags, type=parse_bool, nargs="?", const=True, default=default,
                                help=help)
        elif typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            # --key a b or --key a --key b build the list; absent, the field keeps its default
            parser.add_argument(*flags, type=item, nargs="+", action="extend",
                                default=argparse.SUPPRESS, help=f"{help} (default: {default})")
        else:
            parser.add_argument(*flags, type=kind, default=default, help=help)
    args = vars(parser.parse_args(argv))
    if defaults is not None:  # a list flag that was not given keeps the defaults' list
        args = {**{f.name: getattr(defaults, f.name) for f in dataclasses.fields(cls)}, **args}
    return cls(**args)


def check_ranges(cfg, in_range: dict[str, bool]):
    """Refuses the first flag whose value is out of range ({field: whether its value is fine}),
    naming it with its value and its meaning from --help."""
    for name, ok in in_range.items():
        if not ok:
            meaning = type(cfg).__dataclass_fields__[name].metadata["help"]
            raise ValueError(f"--{name.replace('_', '-')}={getattr(cfg, name)} is out of range: "
                             f"{meaning}")


def run_command(cls, run, argv, description: str) -> int:
    """Runs run(config from argv); a mistake in the input, the files or the flags (ValueError,
    OSError) is one `error:` line on stderr and exit status 1, not a traceback; Ctrl-C is exit
    status 130, after what `run` keeps of the work finished (its `finally`)."""
    try:
        run(parse(cls, argv, description))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


def run_commands(commands: dict, argv, doc: str) -> int:
    """Runs `program COMMAND --flags`, commands[COMMAND] = (config class, function, one-line help).
    """
    if not argv or argv[0] not in commands:
        print(doc + "\ncommands: " + ", ".join(f"{name} ({help})" for name, (_, _, help)
                                              in commands.items())
              + f"\n`python {Path(sys.argv[0]).name} COMMAND --help` lists a command's options.")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cls, run, help = commands[argv[0]]
    return run_command(cls, run, argv[1:], help)


class Progress:
    """Long work's progress on stderr, at most every `every` seconds and once at the end: items
    done of the total, their rate (and tokens/s when counted) and the time left."""

    def __init__(self, what: str, total: int, every: float = 2.0, show: bool = True):
        self.what = what
        self.total = total
        self.every = every
        self.show = show
        self.done = self.tokens = 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1, tokens: int = 0):
        self.done += n
        self.tokens += tokens
        now = time.perf_counter()
        final = self.done >= self.total
        if not self.show or (now - self.last < self.every and not final):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        line = f"{self.what}: {self.done:,}/{self.total:,}, {rate:,.1f}/s"
        if self.tokens:
            line += f", {self.tokens / elapsed / 1e6:.2f}M tokens/s"
        left = f"done in {elapsed:.1f}s" if final else f"ETA {(self.total - self.done) / rate:.0f}s"
        print(f"{line}, {left}", file=sys.stderr, flush=True)
