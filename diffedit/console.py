"""What every `diffedit` command shares with the person at the terminal: the contract for bad input and failures,
flag types that name their valid range, and notes, warnings and progress bars on stderr (stdout is for --json).

The contract (docs/design.md §5): bad input (arguments, files, models, output paths) is one line
`diffedit: error: ...` and exit status 2; a failure inside is one line and exit status 1; an interrupt is exit
status 130 (its line says what was kept); stdout closed by its reader is exit status 141, quietly; a traceback
only with --debug. Torch-free, so a command refuses bad arguments in milliseconds.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import traceback
from collections.abc import Callable

from .locations import ModelNotFoundError
from .outputs import OutputPathError
from .params import MAX_NUM_MAPS  # one cap for --num-maps and DiffEditParams
from .validation import FileError, one_line

PROG = "diffedit"
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a Unix tool killed by writing to a closed pipe


class BadInput(ValueError):
    """A problem with what the user gave (arguments, files, model): one line, exit status 2."""


# What is the input's fault, whichever layer noticed it: exit status 2
BAD_INPUT = (BadInput, FileError, OutputPathError, ModelNotFoundError)


def guarded(run: Callable[[], int | None], debug: bool = False) -> int:
    """Run a command under the contract: what it returns (None: 0), else the exit status of what it raised, said in
    one line on stderr (a traceback too with `debug`)."""
    try:
        status = run()
        if sys.stdout is not None:  # None when fd 1 was closed (`>&-`): nothing to flush
            sys.stdout.flush()  # a closed pipe shows here, inside the contract, not at the interpreter's exit
        return status or 0
    except BAD_INPUT as e:
        if debug:
            traceback.print_exception(e)
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:  # a command that had written files raises one saying what it kept
        print(f"{PROG}: {e}" if str(e) else f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `diffedit ... --json | true`: the reader left first; end quietly, as Unix tools do
        if sys.stdout is not None:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return EXIT_BROKEN_PIPE
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line unless --debug
        if debug:
            raise
        hint, said = "", str(e).lower()
        if "out of memory" in said:  # an accelerator's
            hint = " (try --dtype float16, a smaller image, or --device cpu)"
        elif "can't allocate memory" in said:  # the CPU allocator's
            hint = " (try a smaller image or batch, fewer --num-maps, or a machine with more memory)"
        print(f"{PROG}: error: {type(e).__name__}: {one_line(e)}{hint} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILURE


# ---------------------------------------------------------------------------------------------------------------
# Flags


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`diffedit: error: ...`), so they read like every other bad input."""

    def error(self, message):
        given = re.fullmatch(r"argument (?:\S+/)?(-\S+): expected one argument", message)
        if given:  # also what argparse says of a value that starts with '-' (--source "-x"): say how to give one
            message += f" (a value that starts with '-' is written {given.group(1)}=VALUE)"
        raise BadInput(f"{message} (see `{self.prog} --help`)")

    def parse_args(self, args=None, namespace=None):
        """argparse's, except that arguments no (sub)command takes point to that command's --help: argparse
        reports them from the top parser, whose help does not list the command's flags."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            where = f"{self.prog} {command}" if command else self.prog
            raise BadInput(f"unrecognized arguments: {' '.join(extras)} (see `{where} --help`)")
        return parsed


def number(kind: type, lo=None, hi=None, lo_open=False):
    """An argparse type: an int or float (finite) in a range, refused with the valid range named."""
    if hi is not None:
        what = f" in {'(' if lo_open else '['}{lo}, {hi}]"
    else:
        what = f" {'>' if lo_open else '>='} {lo}"
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}{what}, got {text!r}") from None
        too_low = value <= lo if lo_open else value < lo
        if (kind is float and not math.isfinite(value)) or too_low or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {noun}{what}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


STEPS = number(int, 1)
RATIO = number(float, 0, 1, lo_open=True)
COUNT = number(int, 1)
NUM_MAPS = number(int, 1, MAX_NUM_MAPS)
POSITIVE = number(float, 0, lo_open=True)
GUIDANCE = number(float, 0)
TIMESTEP = number(int, 0)
SEED = number(int, 0, 2**63 - 1)
# Held-out edits per run (evaluate, experiment --n): drawing 100000 takes seconds and scoring them days; 10**15
# hung while the edit list was built.
MAX_EDITS = 100_000
EDIT_COUNT = number(int, 1, MAX_EDITS)
# torch CPU threads: far past any core count, thread creation fails (20000) or the process dies (50000)
MAX_THREADS = 1024
THREADS = number(int, 1, MAX_THREADS)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes (--compile MODE)
DEVICES = ("auto", "cpu", "cuda", "mps")  # --device's choices (auto: cuda, then mps, then cpu)


def compile_mode(text: str) -> str:
    """--compile's optional MODE. Anything else is named with the likely cause: the flag took the next argument
    (`--compile in.png`), since its MODE is optional."""
    if text not in COMPILE_MODES:
        looks_like_a_path = "." in text or "/" in text or os.path.exists(text)
        cause = (f"; --compile took the next argument as its MODE: put --compile after {text!r}, or write "
                 "--compile=MODE") if looks_like_a_path else ""
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {', '.join(map(repr, COMPILE_MODES))}){cause}")
    return text


def add_compile_flag(p, what: str = "the UNet") -> None:
    """--compile [MODE]: absent None, bare "default"."""
    p.add_argument("--compile", nargs="?", const="default", type=compile_mode, metavar="MODE",
                   help=f"torch.compile {what} in MODE: default, reduce-overhead (CUDA graphs on a GPU) or "
                        "max-autotune; the first edit at each shape compiles (minutes on a CPU), so it pays over many "
                        "edits")


# ---------------------------------------------------------------------------------------------------------------
# Messages


class Reporter:
    """Notes (odd but valid input), warnings, progress bars and the summary, all on stderr; --json owns stdout."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.notes: list[str] = []
        self.warnings: list[str] = []
        self.bars = not quiet and sys.stderr.isatty()

    def note(self, message: str) -> None:
        self.notes.append(message)
        if not self.quiet:
            print(f"{PROG}: note: {message}", file=sys.stderr)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            print(f"{PROG}: warning: {message}", file=sys.stderr)

    def progress(self, total: int, desc: str):
        """A tqdm bar on stderr, or a stand-in when stderr is not a terminal or with --quiet."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, disable=not self.bars, leave=False, unit="step")
