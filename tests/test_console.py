"""The command-line contract every command runs under: exit 0 / 1 / 2 / 130, one line, a traceback only with
--debug; and flag types that name their valid range at its boundaries."""

import argparse

import pytest

from diffedit.console import (EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, RATIO, SEED, STEPS, BadInput, Reporter,
                              guarded)
from diffedit.image_files import ImageFileError
from diffedit.locations import ModelNotFoundError
from diffedit.outputs import OutputPathError


def raising(error: BaseException):
    def run():
        raise error
    return run


@pytest.mark.parametrize("error", [BadInput("bad --steps"), ImageFileError("input image x.png is corrupt"),
                                   OutputPathError("output folder d does not exist"),
                                   ModelNotFoundError("model folder m does not exist")])
def test_the_inputs_fault_is_one_line_and_exit_2(error, capsys):
    assert guarded(raising(error)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err == f"diffedit: error: {error}\n"


def test_a_failure_inside_is_one_line_and_exit_1_with_the_traceback_only_under_debug(capsys):
    assert guarded(raising(RuntimeError("boom\nsecond line"))) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert err == "diffedit: error: RuntimeError: boom; second line (run with --debug for the traceback)\n"
    assert guarded(raising(RuntimeError("CUDA out of memory"))) == EXIT_FAILURE
    assert "(try --dtype float16, a smaller image, or --device cpu)" in capsys.readouterr().err
    assert guarded(raising(RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't "
                                        "allocate memory: you tried to allocate 8192000000000000 bytes."))) == 1
    assert "(try a smaller image or batch, fewer --num-maps" in capsys.readouterr().err  # the CPU's words for it
    with pytest.raises(RuntimeError, match="boom"):
        guarded(raising(RuntimeError("boom")), debug=True)
    assert guarded(raising(BadInput("bad")), debug=True) == EXIT_BAD_INPUT
    assert "Traceback" in capsys.readouterr().err


def test_an_interrupt_is_exit_130_and_success_is_0(capsys):
    assert guarded(raising(KeyboardInterrupt())) == EXIT_INTERRUPTED == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert guarded(lambda: None) == 0
    # a command that had written files says what it kept, in its own words, instead
    assert guarded(raising(KeyboardInterrupt("interrupted; kept run/log.jsonl"))) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "diffedit: interrupted; kept run/log.jsonl\n"


def test_flag_types_accept_their_bounds_and_name_the_range_past_them():
    assert STEPS("1") == 1 and RATIO("1") == 1.0 and SEED(str(2**63 - 1)) == 2**63 - 1
    for parse, text, message in [(STEPS, "0", "expected an integer >= 1, got 0"),
                                 (STEPS, "ten", "expected an integer >= 1, got 'ten'"),
                                 (RATIO, "0", "expected a number in (0, 1], got 0"),  # open at 0
                                 (RATIO, "1.0001", "expected a number in (0, 1], got 1.0001"),
                                 (RATIO, "nan", "expected a number in (0, 1], got nan"),
                                 (SEED, str(2**63), "expected an integer in [0, 9223372036854775807]")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message.replace("(", r"\(").replace("[", r"\[")):
            parse(text)


def test_notes_are_kept_and_said_unless_quiet_and_warnings_are_said_once(capsys):
    loud, quiet = Reporter(quiet=False), Reporter(quiet=True)
    for report in (loud, quiet):
        report.note("odd input")
        report.warn("careful")
        report.warn("careful")
    assert loud.notes == quiet.notes == ["odd input"] and loud.warnings == quiet.warnings == ["careful"]
    err = capsys.readouterr().err
    assert err == "diffedit: note: odd input\ndiffedit: warning: careful\ndiffedit: warning: careful\n"


def test_the_num_maps_flag_refuses_counts_past_1000_before_any_work():
    from diffedit.console import MAX_NUM_MAPS, NUM_MAPS

    assert NUM_MAPS("1") == 1 and NUM_MAPS(str(MAX_NUM_MAPS)) == MAX_NUM_MAPS == 1000
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected an integer in \[1, 1000\], got 100000"):
        NUM_MAPS("100000")


def test_an_argument_no_subcommand_takes_points_to_that_subcommands_help():
    from diffedit.console import Parser

    parser = Parser(prog="diffedit")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    sub.add_parser("mask").add_argument("--source")
    with pytest.raises(BadInput, match=r"unrecognized arguments: --latents x \(see `diffedit mask --help`\)"):
        parser.parse_args(["mask", "--source", "a", "--latents", "x"])
    with pytest.raises(BadInput, match=r"unrecognized arguments: --nope \(see `diffedit --help`\)"):
        parser.parse_args(["--nope"])
    assert parser.parse_args(["mask", "--source", "a"]).source == "a"


def test_a_closed_stdout_is_no_failure_and_a_broken_pipe_without_one_is_141(monkeypatch):
    from diffedit.console import EXIT_BROKEN_PIPE

    monkeypatch.setattr("sys.stdout", None)  # Python's stdout when fd 1 was closed (`diffedit ... >&-`)
    assert guarded(lambda: None) == 0  # the run's files were written: nothing to flush is no AttributeError
    assert guarded(raising(BrokenPipeError())) == EXIT_BROKEN_PIPE


def test_a_value_that_starts_with_a_dash_is_refused_saying_how_to_give_it():
    from diffedit.console import Parser

    parser = Parser(prog="diffedit")
    parser.add_argument("--source")
    parser.add_argument("-o", "--output")
    for args, flag in [(["--source", "-red"], "--source"), (["-o", "-out.png"], "--output")]:
        with pytest.raises(BadInput, match=rf"argument .*{flag}: expected one argument \(a value that starts with "
                                           rf"'-' is written {flag}=VALUE\)"):
            parser.parse_args(args)
    assert parser.parse_args(["--source=-red", "--output=-out.png"]).output == "-out.png"
