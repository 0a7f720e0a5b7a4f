"""Output writing: names per target, location checks before work, and all-or-nothing commits."""

import os
import stat
from pathlib import Path

import pytest

from diffedit.outputs import OutputPathError, Planned, check_outputs, commit, expand_names, image_format, plan_images


def test_output_names_for_several_targets():
    assert expand_names("out.png", ["a"]) == [Path("out.png")]
    assert expand_names("d/out.png", ["a", "b"]) == [Path("d/out-1.png"), Path("d/out-2.png")]
    assert expand_names("{i}_{target}.jpg", ["A Red Circle!", ""]) == [Path("1_a-red-circle.jpg"),
                                                                           Path("2_empty.jpg")]


def _writer(data: bytes):
    return lambda tmp: Path(tmp).write_bytes(data)


def test_locations_are_checked_before_any_work(tmp_path):
    (tmp_path / "in.png").write_bytes(b"x")
    ok = [Planned(tmp_path / "a.png", "output"), Planned(tmp_path / "b.png", "--mask-out")]
    check_outputs(ok, {"input image": tmp_path / "in.png"})
    cases = [
        ([Planned(tmp_path, "output")], "is a folder; give a file name"),
        ([Planned(tmp_path / "nope" / "a.png", "output")], "output folder .*nope does not exist"),
        ([Planned(tmp_path / "in.png" / "a.png", "output")], "in.png is not a folder"),
        ([Planned(tmp_path / "a.png", "output"), Planned(tmp_path / "a.png", "--mask-out")],
         "output and --mask-out would both be written to"),
        ([Planned(tmp_path / "in.png", "output")], "is the input image; pass --force to overwrite it"),
    ]
    for planned, message in cases:
        with pytest.raises(OutputPathError, match=message):
            check_outputs(planned, {"input image": tmp_path / "in.png"}, overwrite_hint="pass --force")
    check_outputs([Planned(tmp_path / "in.png", "output")], {"input image": tmp_path / "in.png"},
                  overwrite_inputs=True)


def test_two_outputs_through_a_symlinked_folder_are_one_path(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")  # link/m.png is real/m.png: one rename would replace the other's file
    with pytest.raises(OutputPathError, match="output and --heatmap-out would both be written to"):
        check_outputs([Planned(tmp_path / "real" / "m.png", "output"),
                       Planned(tmp_path / "link" / "m.png", "--heatmap-out")], {})


def test_an_extension_pillow_cannot_write_is_refused():
    assert image_format(Path("a.PNG"), "output") == "PNG" and image_format(Path("a.jpg"), "output") == "JPEG"
    with pytest.raises(OutputPathError, match=r"unknown image extension '\.txt'"):
        image_format(Path("a.txt"), "output")


def test_commit_writes_every_output_or_none(tmp_path):
    first, second = tmp_path / "first.bin", tmp_path / "second.bin"
    first.write_bytes(b"old first")
    second.write_bytes(b"old second")

    def fail(tmp):
        Path(tmp).write_bytes(b"partial")
        raise OSError("disk full")

    # the second write fails after the first was written to its temporary file: nothing changes
    with pytest.raises(OSError, match="disk full"):
        commit([Planned(first, "output", _writer(b"new first")), Planned(second, "--mask-out", fail)])
    assert first.read_bytes() == b"old first" and second.read_bytes() == b"old second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.bin", "second.bin"]  # no temporary file left
    commit([Planned(first, "output", _writer(b"new first")), Planned(second, "--mask-out", _writer(b"new second"))])
    assert first.read_bytes() == b"new first" and second.read_bytes() == b"new second"


def test_a_replaced_file_keeps_its_permissions_and_a_new_one_follows_the_umask(tmp_path):
    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"x")
    os.chmod(kept, 0o640)
    old = os.umask(0o022)
    try:
        commit([Planned(kept, "output", _writer(b"y")), Planned(tmp_path / "new.bin", "output", _writer(b"z"))])
    finally:
        os.umask(old)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o644


def test_plan_images_names_and_checks_every_output_per_target(tmp_path):
    plan = plan_images([("output", str(tmp_path / "out.png")), ("--mask-out", None),
                        ("--compare-out", str(tmp_path / "{i}-{target}.jpg"))], ["a b", "c"], {})
    assert plan == {"output": [(tmp_path / "out-1.png", "PNG"), (tmp_path / "out-2.png", "PNG")],
                    "--compare-out": [(tmp_path / "1-a-b.jpg", "JPEG"), (tmp_path / "2-c.jpg", "JPEG")]}
    with pytest.raises(OutputPathError, match="would both be written"):  # two targets whose names slug alike
        plan_images([("output", str(tmp_path / "x{target}.png"))], ["a!", "a?"], {})


def test_target_names_keep_letters_of_any_script():
    """{target} kept ASCII letters only: "日本" was "empty" (so two such targets collided) and "café" "caf"."""
    from diffedit.outputs import expand_names

    names = expand_names("{target}.png", ["日本の猫", "a café", "Ünïcode_and/slash: x?", "!!!"])
    assert [p.name for p in names] == ["日本の猫.png", "a-café.png", "ünïcode-and-slash-x.png", "empty.png"]
    assert expand_names("{target}.png", ["cafe\u0301"])[0].name == "café.png"  # NFD written as NFC

