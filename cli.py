"""Command lines from config dataclasses: every field is a `--key=value` flag, `--help` lists them all.

    @dataclass
    class Config:
        steps: int = arg(100, "optimizer steps")
        files: list[str] = arg([], "input files (repeat the flag)")

    cfg = parse(Config, sys.argv[1:], "what the program does")
"""

import argparse
import dataclasses
import typing


def arg(default, help: str):
    """A config field with its default and a one-line meaning for --help."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
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
    """An instance of the dataclass cls from argv (flags --key=value, --key value, or --flag for a bool);
    unset flags take their values from `defaults` (an instance of cls) or else the field defaults."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, type(int | None)):  # X | None: parse as X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        flags = dict.fromkeys(["--" + f.name.replace("_", "-"), "--" + f.name])  # --max-len or --max_len
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(*flags, type=parse_bool, nargs="?", const=True, default=default, help=help)
        elif typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            # --key a b or --key a --key b build the list; absent, the field keeps its default
            parser.add_argument(*flags, type=item, nargs="+", action="extend", default=argparse.SUPPRESS,
                                help=f"{help} (default: {default})")
        else:
            parser.add_argument(*flags, type=kind, default=default, help=help)
    args = vars(parser.parse_args(argv))
    if defaults is not None:  # a list flag that was not given keeps the defaults' list
        args = {**{f.name: getattr(defaults, f.name) for f in dataclasses.fields(cls)}, **args}
    return cls(**args)
