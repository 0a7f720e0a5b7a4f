"""Where models come from: the shipped model, folders, hub repo ids, and everything else refused by name."""

from pathlib import Path

import pytest

from diffedit import locations
from diffedit.locations import ModelNotFoundError, looks_like_repo_id, model_location


def test_the_shipped_model_and_its_example_picture_are_installed():
    assert model_location(None) == locations.SHIPPED_MODEL and locations.shipped_model_installed()
    assert locations.EXAMPLE_IMAGE.is_file()


def test_folders_are_paths_repo_ids_are_text_and_the_rest_is_refused(tmp_path):
    assert model_location(tmp_path) == tmp_path and isinstance(model_location(str(tmp_path)), Path)
    assert model_location("stabilityai/stable-diffusion-2-1") == "stabilityai/stable-diffusion-2-1"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelNotFoundError, match="is a file; give the folder that holds model_index.json"):
        model_location(tmp_path / "file")
    with pytest.raises(ModelNotFoundError, match="model folder no/such/folder does not exist"):
        model_location("no/such/folder")
    single = tmp_path / "model.SafeTensors"
    single.write_bytes(b"")
    assert model_location(str(single)) == single  # a single-file checkpoint: a Path (what it holds is read later)
    for name in ("model.ckpt", "model.pt", "model.bin"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(ModelNotFoundError, match=f"model file .*{name} is a pickle checkpoint; diffedit loads "
                                                     "safetensors only: convert it to .safetensors first"):
            model_location(tmp_path / name)
    with pytest.raises(ModelNotFoundError, match="model file .*gone.safetensors does not exist"):
        model_location(tmp_path / "gone.safetensors")
    for text, repo in [("a/b", True), ("a.b/c-d_e", True), ("./a", False), ("a/b/c", False), ("/a/b", False),
                       ("~/a", False), ("a", False)]:
        assert looks_like_repo_id(text) is repo, text


def test_a_missing_shipped_model_says_how_to_pass_another(monkeypatch, tmp_path):
    monkeypatch.setattr(locations, "SHIPPED_MODEL", tmp_path / "shapes-sd")
    with pytest.raises(ModelNotFoundError, match="ships with diffedit is not installed"):
        model_location(None)
