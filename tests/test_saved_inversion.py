"""Saved inversions: the public save / load pair, the file layout `diffedit invert` has always written, and every
check that keeps a file from being reused with the wrong model or settings."""

import hashlib
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import diffedit
from diffedit import DiffEditParams, StableDiffusion, method
from diffedit.image_tensors import to_tensor
from diffedit.models.lora import file_digest
from diffedit.saved_inversion import (InversionFileError, check_picture, load_inversion, model_fingerprint,
                                      picture_digest, read_inversion_metadata, save_inversion)
from diffedit.validation import FileError

STEPS = 4


@pytest.fixture(scope="module")
def sd():
    return StableDiffusion.from_pretrained(diffedit.SHIPPED_MODEL)


@pytest.fixture(scope="module")
def inverted(sd):
    """A 4-step inversion of a 64x64 picture with the shipped model, and its parameters."""
    params = DiffEditParams.for_model(sd, num_inference_steps=STEPS)
    image = to_tensor(torch.linspace(0, 1, 3 * 64 * 64).reshape(3, 64, 64), sd.vae_scale_factor)
    text = method.encode_text(sd, ["a red circle on a gray background"], [""])
    return method.invert(sd, image, text, params, torch.Generator().manual_seed(0)), params


def test_save_then_load_gives_the_same_tensors_and_the_settings(sd, inverted, tmp_path):
    inversion, params = inverted
    path = tmp_path / "inv.safetensors"
    written = save_inversion(path, inversion, model=sd, params=params, image_size=(65, 64), prompt="a", seed=5)
    loaded, meta = load_inversion(path, sd)
    assert torch.equal(loaded.latents, inversion.latents) and torch.equal(loaded.clean, inversion.clean)
    assert torch.equal(loaded.timesteps, inversion.timesteps)
    assert len(inversion.timesteps) == int(STEPS * params.inpaint_strength)  # 4 x 0.6 -> 2 levels
    assert (meta["steps"], meta["strength"], meta["guidance"]) == (STEPS, params.inpaint_strength,
                                                                   params.inversion_guidance_scale)
    assert (meta["width"], meta["height"], meta["working_width"], meta["working_height"]) == (65, 64, "64", "64")
    assert meta["prompt"] == "a" and meta["seed"] == "5" and meta["mode"] == "corrected"
    assert meta["model"] == str(diffedit.SHIPPED_MODEL.resolve()) and written["model_fingerprint"] == \
        model_fingerprint(diffedit.SHIPPED_MODEL) == meta["model_fingerprint"]
    # without a model: float32 on the CPU, no model check
    alone, _ = load_inversion(path)
    assert alone.latents.dtype == torch.float32 and alone.latents.device.type == "cpu"


def test_the_mode_names_the_corrections_that_ran(sd, inverted, tmp_path):
    inversion, params = inverted
    for p, mode in ((DiffEditParams.reference(num_inference_steps=STEPS, inpaint_strength=params.inpaint_strength),
                     "reference"),
                    (params.updated({"paste_matching_step": False}), "mixed")):
        save_inversion(tmp_path / f"{mode}.safetensors", inversion, model=sd, params=p, image_size=(64, 64))
        assert read_inversion_metadata(tmp_path / f"{mode}.safetensors")["mode"] == mode


def test_a_file_in_the_layout_invert_has_always_written_loads(sd, inverted, tmp_path):
    """Built by hand, key by key, as `diffedit invert` 0.1.0 wrote it: not by save_inversion."""
    inversion, _ = inverted
    meta = {"format": "diffedit-latents", "version": "1", "model": "/somewhere/shapes-sd",
            "model_fingerprint": model_fingerprint(diffedit.SHIPPED_MODEL), "steps": "4", "strength": "0.6",
            "width": "64", "height": "64", "working_width": "64", "working_height": "64", "prompt": "a red circle",
            "guidance": "1.0", "seed": "0", "mode": "corrected", "diffedit_version": "0.1.0"}
    tensors = {"latents": inversion.latents[0].clone(), "timesteps": inversion.timesteps.clone(),
               "clean": inversion.clean[0].clone()}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    loaded, read = load_inversion(tmp_path / "old.safetensors", sd)
    assert torch.equal(loaded.latents, inversion.latents) and torch.equal(loaded.clean, inversion.clean)
    assert (read["steps"], read["strength"], read["guidance"], read["width"]) == (4, 0.6, 1.0, 64)


def test_a_file_from_another_model_is_refused(sd, inverted, tmp_path):
    inversion, params = inverted
    path = tmp_path / "inv.safetensors"
    save_inversion(path, inversion, model=sd, params=params, image_size=(64, 64))
    other_folder = shutil.copytree(diffedit.SHIPPED_MODEL, tmp_path / "other")
    weights = other_folder / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state["conv_out.bias"] = state["conv_out.bias"] + 1  # a retrained model: same shapes, other weights
    save_file(state, str(weights))
    other = StableDiffusion.from_pretrained(other_folder)
    with pytest.raises(InversionFileError, match="inverted with another model"):
        load_inversion(path, other)


@pytest.mark.parametrize("damage, message", [
    ({"format": "something-else"}, "is not a latents file"),
    ({"version": "2"}, "has version 2; this diffedit reads version 1"),
    ({"steps": "four"}, "damaged metadata"),
    ({"guidance": None}, "damaged metadata"),
    ({"guidance": "1e400"}, r"damaged metadata \(guidance=inf\): invert again"),
    ({"strength": "nan"}, r"damaged metadata \(strength=nan\)"),
    ({"strength": "1.5"}, r"damaged metadata \(strength=1.5\)"),
    ({"lora_scale": "-inf"}, r"damaged metadata \(lora_scale=-inf\)"),
    ({"steps": "0"}, r"damaged metadata \(steps=0\)"),
    ({"sampler": "euler"}, r"inverted with sampler 'euler', which this diffedit does not know"),
])
def test_damaged_or_foreign_metadata_is_one_file_error(sd, inverted, tmp_path, damage, message):
    inversion, params = inverted
    path = tmp_path / "inv.safetensors"
    meta = {k: str(v) for k, v in save_inversion(path, inversion, model=sd, params=params,
                                                  image_size=(64, 64)).items()}
    meta = {k: v for k, v in {**meta, **damage}.items() if v is not None}
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(InversionFileError, match=message) as e:
        load_inversion(path, sd)
    assert isinstance(e.value, FileError) and isinstance(e.value, ValueError) and str(path) in str(e.value)


def test_not_a_safetensors_file_and_tensors_of_wrong_shapes_are_refused(sd, inverted, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InversionFileError, match="is not a safetensors file"):
        read_inversion_metadata(tmp_path / "notes.txt")
    with pytest.raises(InversionFileError, match="does not exist"):
        read_inversion_metadata(tmp_path / "missing.safetensors")
    inversion, params = inverted
    path = tmp_path / "inv.safetensors"
    meta = save_inversion(path, inversion, model=sd, params=params, image_size=(64, 64))
    save_file({"latents": inversion.latents[0], "timesteps": inversion.timesteps[:1], "clean": inversion.clean[0]},
              str(path), metadata={k: str(v) for k, v in meta.items()})
    with pytest.raises(InversionFileError, match="unexpected shapes"):
        load_inversion(path, sd)


def test_only_one_image_of_a_loaded_model_is_saved(sd, inverted, tmp_path):
    inversion, params = inverted
    with pytest.raises(ValueError, match="one image's inversion, got a batch of 2"):
        save_inversion(tmp_path / "two.safetensors", inversion.repeat_interleave(2), model=sd, params=params,
                       image_size=(64, 64))
    built = StableDiffusion(**{**sd.__dict__, "folder": None})
    with pytest.raises(ValueError, match="from_pretrained"):
        save_inversion(tmp_path / "built.safetensors", inversion, model=built, params=params, image_size=(64, 64))
    assert not list(tmp_path.iterdir())  # nothing written


def test_model_fingerprint_follows_the_weights_not_the_path(tmp_path):
    copy = shutil.copytree(diffedit.SHIPPED_MODEL, tmp_path / "copy")
    assert model_fingerprint(copy) == model_fingerprint(diffedit.SHIPPED_MODEL)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)
    weights.write_bytes(bytes(data))
    assert model_fingerprint(copy) != model_fingerprint(diffedit.SHIPPED_MODEL)


def test_a_file_holding_non_finite_latents_is_refused(sd, inverted, tmp_path):
    inversion, params = inverted
    path = tmp_path / "inv.safetensors"
    meta = save_inversion(path, inversion, model=sd, params=params, image_size=(64, 64))
    latents = inversion.latents[0].clone()
    latents[0, 0, 0, 0] = float("nan")
    save_file({"latents": latents, "timesteps": inversion.timesteps, "clean": inversion.clean[0]}, str(path),
              metadata={k: str(v) for k, v in meta.items()})
    with pytest.raises(InversionFileError, match="holds non-finite values"):
        load_inversion(path, sd)


@pytest.mark.parametrize("change, message", [
    ({"steps": "5"}, r"holds 2 levels but its metadata says steps 5 x strength 0.6 = 3"),
    ({"strength": "0.25"}, r"steps 4 x strength 0.25 = 1"),
    ({"working_width": "68"}, r"holds 16x16 latents \(64x64 pixels\) but its metadata says 68x64"),
])
def test_a_file_whose_tensors_disagree_with_its_own_metadata_is_refused(sd, inverted, tmp_path, change, message):
    inversion, params = inverted
    path = tmp_path / "inv.safetensors"
    meta = {k: str(v) for k, v in save_inversion(path, inversion, model=sd, params=params,
                                                  image_size=(64, 64)).items()}
    save_file({"latents": inversion.latents[0], "timesteps": inversion.timesteps, "clean": inversion.clean[0]},
              str(path), metadata={**meta, **change})
    with pytest.raises(InversionFileError, match=message):
        load_inversion(path, sd)


def test_an_inversion_made_with_a_lora_is_refused_without_the_same_lora(sd, inverted, tmp_path):
    """The file records each active adapter's file digest and weight; a model with other adapters (or none, or
    other weights) is refused. The record is `[]` without adapters."""
    inversion, params = inverted
    name, layer = next((n, m) for n, m in sd.unet.named_modules() if n.endswith("attn2.to_k"))
    flat = "lora_unet_" + name.replace(".", "_")
    lora = tmp_path / "style.safetensors"
    save_file({f"{flat}.lora_down.weight": torch.ones(1, layer.in_features),
               f"{flat}.lora_up.weight": torch.ones(layer.out_features, 1)}, str(lora))
    path = tmp_path / "inv.safetensors"
    assert save_inversion(path, inversion, model=sd, params=params, image_size=(64, 64))["lora"] == "[]"
    load_inversion(path, sd)
    try:
        sd.load_lora_weights(lora, adapter_name="style")
        with pytest.raises(InversionFileError, match=r"inverted with LoRA adapters \[\] .*--lora"):
            load_inversion(path, sd)
        meta = save_inversion(path, inversion, model=sd, params=params, image_size=(64, 64))
        assert json.loads(meta["lora"]) == [[file_digest(lora), 1.0]]
        load_inversion(path, sd)
        sd.set_adapters("style", 0.5)
        with pytest.raises(InversionFileError, match="inverted with LoRA adapters"):
            load_inversion(path, sd)
    finally:
        sd.unload_lora_weights()
    with pytest.raises(InversionFileError, match="inverted with LoRA adapters"):
        load_inversion(path, sd)


def test_an_inversion_made_with_learned_words_is_refused_without_the_same_vectors(sd, inverted, tmp_path):
    """The file records each textual-inversion word, its id count and a digest of its vectors (hand-checked here as
    sha256 of the float32 rows); a model without the word, or with the same word holding other vectors, is
    refused. The record is `[]` without learned words."""
    inversion, params = inverted
    width = sd.text_encoder.embeddings.token_embedding.weight.shape[1]
    vectors = torch.arange(2 * width, dtype=torch.float32).reshape(2, width) / width
    path = tmp_path / "inv.safetensors"
    assert save_inversion(path, inversion, model=sd, params=params, image_size=(64, 64))["embeddings"] == "[]"
    try:
        sd.load_textual_inversion({"<toy>": vectors})
        with pytest.raises(InversionFileError, match=r"inverted with learned words \[\] .*--embedding"):
            load_inversion(path, sd)
        meta = save_inversion(path, inversion, model=sd, params=params, image_size=(64, 64))
        digest = hashlib.sha256(vectors.numpy().tobytes()).hexdigest()[:16]
        assert json.loads(meta["embeddings"]) == [["<toy>", 2, digest]]
        load_inversion(path, sd)
        sd.unload_textual_inversion()
        sd.load_textual_inversion({"<toy>": vectors + 1})
        with pytest.raises(InversionFileError, match="inverted with learned words"):
            load_inversion(path, sd)
    finally:
        sd.unload_textual_inversion()
    with pytest.raises(InversionFileError, match="inverted with learned words"):
        load_inversion(path, sd)


def test_a_file_records_its_pictures_digest_and_check_picture_refuses_another(sd, inverted, tmp_path):
    """`picture=` records a digest of the picture's pixels (mode, size and bytes); check_picture passes the same
    pixels (from another file too), refuses any other, and says False (unchecked) for a file without the record."""
    from PIL import Image

    inversion, params = inverted
    picture = Image.new("RGB", (64, 64), (200, 30, 30))
    path = tmp_path / "inv.safetensors"
    meta = save_inversion(path, inversion, model=sd, params=params, image_size=(64, 64), picture=picture)
    read = read_inversion_metadata(path)
    assert read["image_digest"] == meta["image_digest"] == picture_digest(picture)
    assert check_picture(read, picture.copy(), path) is True
    other = picture.copy()
    other.putpixel((63, 63), (200, 30, 31))  # one channel of one pixel
    with pytest.raises(InversionFileError, match="inv.safetensors was inverted from another picture; invert this one"):
        check_picture(read, other, path)
    unrecorded = save_inversion(tmp_path / "old.safetensors", inversion, model=sd, params=params, image_size=(64, 64))
    assert "image_digest" not in unrecorded and check_picture(unrecorded, other, path) is False


def nan_latents(inversion):
    latents = inversion.latents.clone()
    latents[0, 0, 0, 0, 0] = float("nan")
    return method.Inversion(latents, inversion.timesteps, inversion.clean)


@pytest.mark.parametrize("change, error, message", [
    ({"image_size": (0, 0)}, ValueError, r"image_size: expected the picture's \(width, height\), two ints >= 1, got "
                                         r"\(0, 0\)"),
    ({"image_size": (-5, 7)}, ValueError, r"image_size: .* got \(-5, 7\)"),
    ({"image_size": (64.0, 64.0)}, ValueError, r"image_size: .* got \(64.0, 64.0\)"),
    ({"image_size": ("64", "64")}, ValueError, r"image_size: .* got \('64', '64'\)"),
    ({"image_size": (True, 64)}, ValueError, "image_size"),
    ({"image_size": 64}, ValueError, "image_size"),
    ({"seed": -1}, ValueError, r"seed: expected None or an int in \[0, 2\*\*63\), got -1"),
    ({"seed": 1.5}, ValueError, "seed: expected None or an int"),
    ({"prompt": 3}, TypeError, "prompt: expected None or the text"),
    ({"picture": "a.png"}, TypeError, "picture: expected None or the PIL image"),
    ({"model": None}, TypeError, "model: expected the loaded StableDiffusion that inverted .*from_pretrained.*got "
                                 "NoneType"),
    ({"model": "folder"}, TypeError, "model: expected the loaded StableDiffusion .*got str"),
    ({"params": lambda inv, p: p.to_dict()}, TypeError, "params: expected the DiffEditParams the inversion ran "
                                                           "with"),
    ({"inversion": "latents"}, TypeError, r"inversion: expected method.invert's result"),
    ({"inversion": lambda inv, p: nan_latents(inv)}, ValueError, "inversion: holds NaN or infinite values"),
    ({"params": lambda inv, p: p.updated({"num_inference_steps": 5})}, ValueError,
     r"params: num_inference_steps=5, inpaint_strength=0.6 and sampler ddim give the levels \[401, 201, 1\] on this "
     r"model, but the inversion holds \[251, 1\]: pass the params it was inverted with"),
    ({"params": lambda inv, p: p.updated({"sampler": "dpmsolver++"})}, ValueError,
     r"sampler dpmsolver\+\+ give the levels \[401, 201\]"),
    ({"params": lambda inv, p: p.updated({"inpaint_strength": 0.2})}, ValueError,
     r"params: inpaint_strength=0.2 with num_inference_steps=4 runs no step"),
    ({"path": 3}, TypeError, "path: expected a file path"),
    ({"image_size": (128, 128)}, ValueError, r"image_size: a 128x128 picture is worked on at 128x128 pixels, but the "
                                             r"latents are 16x16 \(64x64 pixels\): pass the size of the picture"),
])
def test_save_refuses_what_load_would_refuse_or_misread_before_writing(sd, inverted, tmp_path, change, error,
                                                                      message):
    """What save_inversion used to write and load_inversion then refused as damaged (a size of 0, a float size,
    NaN latents, params of another step count), or wrote as a wrong record (another sampler's params), or failed
    on with Python's own error (a model that is a folder's name): refused, naming the argument, nothing written."""
    inversion, params = inverted
    args = {"path": tmp_path / "inv.safetensors", "inversion": inversion, "model": sd, "params": params,
            "image_size": (64, 64)}
    for key, value in change.items():
        args[key] = value(inversion, params) if callable(value) else value
    with pytest.raises(error, match=message):
        save_inversion(args.pop("path"), args.pop("inversion"), **args)
    assert list(tmp_path.iterdir()) == []


def test_numpy_ints_are_a_size_and_a_seed_and_are_recorded_as_python_ints(sd, inverted, tmp_path):
    import numpy as np

    inversion, params = inverted
    path = tmp_path / "inv.safetensors"
    meta = save_inversion(path, inversion, model=sd, params=params, image_size=(np.int64(65), np.int32(64)),
                          seed=np.int64(5))
    assert [(meta[k], type(meta[k])) for k in ("width", "height", "seed")] == [(65, int), (64, int), (5, int)]
    read = read_inversion_metadata(path)
    assert (read["width"], read["height"], read["seed"]) == (65, 64, "5")


@pytest.mark.parametrize("where, message", [
    (".", r"latents file \. is a folder; give a file name"),
    ("missing/inv.safetensors", "output folder missing does not exist"),
])
def test_a_path_that_cannot_be_written_is_the_packages_file_error(sd, inverted, tmp_path, monkeypatch, where,
                                                                   message):
    """`.` used to fail in os.replace (OSError: Device or resource busy), a missing folder with FileNotFoundError on
    a temporary file's name: now one error that is both the package's file error and the command line's output-path
    error, with the path named, before anything is written."""
    from diffedit.outputs import OutputPathError
    from diffedit.saved_inversion import InversionPathError

    monkeypatch.chdir(tmp_path)
    inversion, params = inverted
    with pytest.raises(InversionPathError, match=message) as e:
        save_inversion(where, inversion, model=sd, params=params, image_size=(64, 64))
    assert isinstance(e.value, FileError) and isinstance(e.value, OutputPathError)
    assert list(tmp_path.iterdir()) == []


def test_an_inversion_is_never_written_into_the_models_folder(inverted, tmp_path):
    model_folder = shutil.copytree(diffedit.SHIPPED_MODEL, tmp_path / "model")
    copy = StableDiffusion.from_pretrained(model_folder)
    inversion, params = inverted
    before = sorted(p.relative_to(model_folder) for p in model_folder.rglob("*"))
    for where in (model_folder / "inv.safetensors", model_folder / "unet" / "diffusion_pytorch_model.safetensors"):
        with pytest.raises(FileError, match="would write into the model"):
            save_inversion(where, inversion, model=copy, params=params, image_size=(64, 64))
    assert sorted(p.relative_to(model_folder) for p in model_folder.rglob("*")) == before
    StableDiffusion.from_pretrained(model_folder)  # still loads


def test_load_takes_a_loaded_model_or_none_and_refuses_a_folders_name(sd, inverted, tmp_path):
    inversion, params = inverted
    path = tmp_path / "inv.safetensors"
    save_inversion(path, inversion, model=sd, params=params, image_size=(64, 64))
    with pytest.raises(TypeError, match="model: expected None or the loaded StableDiffusion .*got str"):
        load_inversion(path, str(diffedit.SHIPPED_MODEL))
    with pytest.raises(TypeError, match="path: expected a file path"):
        load_inversion(None, sd)


def test_a_file_from_a_model_with_another_tokenizer_is_refused(sd, inverted, tmp_path):
    """The model fingerprint leaves tokenizer/ out, and another padding token alone moves every text state (6.8 at
    most on the shipped model): such a file loaded silently. The tokenizer is recorded now; older files, which do
    not record it, still load (test_a_file_in_the_layout_invert_has_always_written_loads)."""
    inversion, params = inverted
    path = tmp_path / "inv.safetensors"
    save_inversion(path, inversion, model=sd, params=params, image_size=(64, 64))
    folder = shutil.copytree(diffedit.SHIPPED_MODEL, tmp_path / "other")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((folder / "tokenizer" / name).read_text())
        (folder / "tokenizer" / name).write_text(json.dumps({**config, "pad_token": "!"}))
    other = StableDiffusion.from_pretrained(folder)
    text = lambda model: method.encode_text(model, ["a red circle"]).cond
    assert model_fingerprint(folder) == model_fingerprint(diffedit.SHIPPED_MODEL)
    assert not torch.equal(text(other), text(sd))
    with pytest.raises(InversionFileError, match="inverted with another tokenizer"):
        load_inversion(path, other)
    load_inversion(path, StableDiffusion.from_pretrained(shutil.copytree(diffedit.SHIPPED_MODEL, tmp_path / "copy")))


def _resaved(path, meta: dict, **tensors):
    with safe_open(str(path), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**saved, **tensors}, str(path), metadata={k: str(v) for k, v in meta.items()})


def test_levels_other_than_the_recorded_settings_give_are_refused(sd, inverted, tmp_path):
    """Levels one off each ([252, 2] for [251, 1]) passed every check (count, order, range) and decoded against
    the wrong schedule; fractional levels were truncated."""
    inversion, params = inverted
    path = tmp_path / "inv.safetensors"
    meta = save_inversion(path, inversion, model=sd, params=params, image_size=(64, 64))
    _resaved(path, meta, timesteps=inversion.timesteps + 1)
    with pytest.raises(InversionFileError, match=r"holds the levels \[252, 2\], but steps 4, strength 0.6 and "
                                                 r"sampler ddim give \[251, 1\] on this model"):
        load_inversion(path, sd)
    _resaved(path, meta, timesteps=inversion.timesteps.double() + 0.5)
    with pytest.raises(InversionFileError, match="holds the levels"):
        load_inversion(path, sd)
    _resaved(path, {**meta, "steps": 2000, "strength": 0.001})  # 2 levels, of steps the schedule does not have
    with pytest.raises(InversionFileError, match="inverted with 2000 steps, more than the model's schedule of 1000"):
        load_inversion(path, sd)


def test_a_file_whose_picture_size_does_not_fit_its_latents_is_refused(sd, inverted, tmp_path):
    """A 128x128 picture with 16x16 latents (64x64 pixels): `edit --latents` of a 128x128 picture failed after the
    mask step with exit 1 (a mask of another shape)."""
    inversion, params = inverted
    path = tmp_path / "inv.safetensors"
    meta = save_inversion(path, inversion, model=sd, params=params, image_size=(66, 62))  # worked on at 64x64
    assert load_inversion(path, sd)[1]["dtype"] == "float32"
    _resaved(path, {**meta, "width": 128, "height": 128})
    with pytest.raises(InversionFileError, match=r"does not fit its own metadata \(a 128x128 picture is worked on at "
                                                 r"128x128 pixels, but the latents are 16x16 \(64x64 pixels\)\)"):
        load_inversion(path, sd)
