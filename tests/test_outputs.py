"""Output writing: names per target, location checks before work, and all-or-nothing commits."""

from pathlib import Path

from diffedit.outputs import expand_names


def test_output_names_for_several_targets():
    assert expand_names("out.png", ["a"]) == [Path("out.png")]
    assert expand_names("d/out.png", ["a", "b"]) == [Path("d/out-1.png"), Path("d/out-2.png")]
    assert expand_names("{i}_{target}.jpg", ["A Red Circle!", ""]) == [Path("1_a-red-circle.jpg"),
                                                                           Path("2_empty.jpg")]
