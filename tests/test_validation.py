"""The checks every config and parameter dataclass uses, and the error family: each rule at its boundary."""

from dataclasses import dataclass

import pytest

from diffedit import DiffEditParams
from diffedit.models.config import UNetConfig
from diffedit.models.weights import WeightsError
from diffedit.schedulers import DDIMConfig
from diffedit.validation import (BOOL, POSITIVE, ConfigError, FileError, check_fields, check_keys, check_readable,
                                 int_at_least, number_in, one_line, optional, shorten)


@dataclass(frozen=True)
class Example:
    count: int = 1
    ratio: float = 0.5
    scale: float = 1.0
    flag: bool = True
    skip: int | None = None

    def __post_init__(self):
        check_fields(self, {"count": int_at_least(1), "ratio": number_in(0, 1), "scale": POSITIVE, "flag": BOOL,
                            "skip": optional(int_at_least(0))}, "Example")


@pytest.mark.parametrize("field, good, bad, what", [
    ("count", 1, 0, "an int >= 1"),  # the bound itself is allowed, one below it is not
    ("count", 2, True, "an int >= 1"),  # bool is not an int here
    ("ratio", 0, -0.001, "a number in [0, 1]"),
    ("ratio", 1, 1.001, "a number in [0, 1]"),
    ("scale", 1e-9, 0, "a positive number"),
    ("flag", False, 0, "True or False"),
    ("skip", 0, -1, "None or an int >= 0"),
])
def test_each_rule_accepts_its_boundary_and_refuses_just_past_it(field, good, bad, what):
    assert getattr(Example(**{field: good}), field) == good
    with pytest.raises(ValueError) as e:
        Example(**{field: bad})
    assert str(e.value) == f"Example.{field}: expected {what}, got {bad!r}"


def test_config_keys_are_read_ignored_or_pinned_and_anything_else_is_named():
    check_keys("unet", {"a": 1, "b": 2, "c": "x", "d": 3}, read={"a"}, ignored={"b"}, pinned={"c": "x", "d": (3, 4)})
    with pytest.raises(ConfigError, match="unet config: unknown field 'e'"):
        check_keys("unet", {"e": 1}, read={"a"})
    with pytest.raises(ConfigError, match=r"unsupported value c='y' \(supported: 'x'\)"):
        check_keys("unet", {"c": "y"}, read=(), pinned={"c": "x"})
    with pytest.raises(ConfigError, match="unsupported value d=5"):
        check_keys("unet", {"d": 5}, read=(), pinned={"d": (3, 4)})


def test_every_dataclass_uses_the_one_helper_and_the_one_error_family():
    with pytest.raises(ValueError, match=r"^DiffEditParams.num_maps_per_mask: expected an int >= 1, got 0$"):
        DiffEditParams(num_maps_per_mask=0)
    with pytest.raises(ConfigError, match=r"^DDIMConfig.steps_offset: expected an int >= 0, got -1$"):
        DDIMConfig(steps_offset=-1)
    with pytest.raises(ConfigError, match="unet config: unknown field 'made_up'"):
        UNetConfig.from_dict({"made_up": 1})
    # files are FileErrors, which are ValueErrors: one `except ValueError` catches every bad value or file
    assert issubclass(ConfigError, FileError) and issubclass(WeightsError, FileError) and issubclass(FileError,
                                                                                                      ValueError)


def test_a_readable_file_is_checked_for_each_way_it_can_be_missing(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    check_readable(tmp_path / "f.txt", "input")
    with pytest.raises(FileError, match="input .*missing.txt does not exist$"):
        check_readable(tmp_path / "missing.txt", "input")
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(FileError, match=r"does not exist \(a broken link\)"):
        check_readable(tmp_path / "link", "input")
    with pytest.raises(FileError, match="is a folder, not a file"):
        check_readable(tmp_path, "input")


def test_messages_are_one_line_and_prompts_are_cut_to_forty_characters():
    assert one_line(ValueError("first\n\n  second  \n")) == "first; second"
    assert one_line(ValueError("")) == "ValueError"
    assert shorten("x" * 40) == repr("x" * 40)  # exactly at the limit: kept whole
    assert shorten("x" * 41) == repr("x" * 37 + "...")  # one past: 37 characters and "..." make 40


def test_listed_names_every_item_up_to_its_limit_and_counts_the_rest_past_it():
    from diffedit.validation import listed

    assert listed(["a", "b", "c"], 3) == "a, b, c"  # exactly the limit: all shown, no count
    assert listed(["a", "b", "c", "d"], 3) == "a, b, c, ... (4 in all)"
    assert listed([], 3) == ""
