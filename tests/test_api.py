"""`diffedit.edit`: the corrected method in one call, at any image size, with the model's stored defaults."""

import json
import shutil
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from diffedit import DiffEditParams, EditResult, StableDiffusion, StableDiffusionDiffEdit, edit, edit_targets
from diffedit import api, method
from diffedit.stable_diffusion import ModelNotFoundError

torch.set_num_threads(1)

FAST = dict(num_inference_steps=5, num_maps_per_mask=2, mask_thresholding_ratio=2.0)


@pytest.fixture(scope="module")
def sd(sd1_folder):
    return StableDiffusion.from_pretrained(sd1_folder)


def photo(size=(64, 64), seed=0) -> PIL.Image.Image:
    small = np.random.RandomState(seed).rand(4, 4, 3)
    return PIL.Image.fromarray((small * 255).astype(np.uint8)).resize(size, PIL.Image.BICUBIC)


def test_edit_returns_image_and_mask_at_the_input_size(sd):
    result = edit(photo((70, 50)), "a cat", "a dog", model=sd, seed=0, **FAST)
    assert isinstance(result, EditResult)
    assert result.image.size == result.mask.size == (70, 50)
    assert result.image.mode == "RGB" and result.mask.mode == "L"
    assert result.guidance_map.shape == result.latent_mask.shape == (6, 9)  # worked at 72 x 48
    assert result.latent_mask.dtype == bool and set(np.unique(np.asarray(result.mask))) <= {0, 255}
    assert np.array_equal(np.asarray(result.mask.resize((9, 6), PIL.Image.NEAREST)) > 0, result.latent_mask)
    assert 0 <= result.guidance_map.min() and result.guidance_map.max() <= 1
    assert result.params.num_inference_steps == 5 and result.params.paste_matching_step


def test_edit_equals_the_corrected_facade_calls_with_the_same_seed(sd):
    image = photo()
    result = edit(image, "a cat", "a dog", model=sd, seed=7, **FAST)
    facade, g = StableDiffusionDiffEdit(sd, DiffEditParams()), torch.Generator().manual_seed(7)
    mask = facade.generate_mask(image=image, source_prompt="a cat", target_prompt="a dog", generator=g,
                                num_maps_per_mask=2, mask_thresholding_ratio=2.0, num_inference_steps=5)
    inv = facade.invert(prompt="a cat", image=image, generator=g, num_inference_steps=5)
    out = facade(prompt="a dog", mask_image=mask, image_latents=inv, generator=g, num_inference_steps=5)
    assert np.array_equal(mask[0].astype(bool), result.latent_mask)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(result.image))


def test_several_targets_share_one_inversion_and_the_first_equals_edit(sd, monkeypatch):
    image = photo(seed=1)
    calls = []
    invert = api.method.invert
    monkeypatch.setattr(api.method, "invert", lambda *a, **k: calls.append(1) or invert(*a, **k))
    results = edit_targets(image, "a cat", ["a dog", "a bird"], model=sd, seed=3, **FAST)
    assert len(results) == 2 and len(calls) == 1
    single = edit(image, "a cat", "a dog", model=sd, seed=3, **FAST)
    assert np.array_equal(np.asarray(results[0].image), np.asarray(single.image))
    with pytest.raises(TypeError, match="list"):
        edit_targets(image, "a cat", "a dog", model=sd, seed=3, **FAST)


def test_edit_each_stages_wrap_mask_and_decode_per_target_and_one_inversion(sd):
    """The command line's progress bar and timings hang on these stages; the callback they yield sees every DDIM
    step, and a stage-wrapped run gives `edit_targets`' pictures."""
    import contextlib

    image, p = photo(seed=2), DiffEditParams.for_model(sd, **FAST)
    events = []

    @contextlib.contextmanager
    def stage(name, index):
        events.append((name, index))
        yield lambda *_: events.append("step")

    texts = [api.prompt_text(sd, t, p) for t in ("a dog", "a bird")]
    got = list(api.edit_each(sd, api.model_pixels(sd, image), image.size, api.prompt_text(sd, "a cat", p), texts,
                             p, torch.Generator().manual_seed(5), stage=stage))
    assert [e for e in events if e != "step"] == [("mask", 0), ("invert", 0), ("decode", 0), ("mask", 1),
                                                  ("decode", 1)]
    assert p.num_inference_steps == 5 and p.inpaint_strength == 0.8  # 4 of the 5 steps encoded and decoded
    assert events.count("step") == 4 + 4 + 4  # one inversion, two decodings; the mask step reports none
    expected = edit_targets(image, "a cat", ["a dog", "a bird"], model=sd, seed=5, **FAST)
    for (picture, latent_mask, _), want in zip(got, expected):
        assert np.array_equal(np.asarray(picture), np.asarray(want.image))
        assert np.array_equal(latent_mask, want.latent_mask)


def test_seed_makes_edits_reproducible(sd):
    a = edit(photo(), "a cat", "a dog", model=sd, seed=11, **FAST)
    b = edit(photo(), "a cat", "a dog", model=sd, seed=11, **FAST)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.seed == b.seed == 11


def test_unknown_parameter_names_fail_listing_the_valid_ones(sd):
    with pytest.raises(TypeError, match="encoding_ratio.*valid names:.*inpaint_strength"):
        edit(photo(), "a cat", "a dog", model=sd, encoding_ratio=0.5)


def test_model_defaults_apply_under_explicit_params(sd1_folder, tmp_path):
    folder = shutil.copytree(sd1_folder, tmp_path / "with_defaults")
    (folder / "diffedit.json").write_text(json.dumps({"num_inference_steps": 4, "num_maps_per_mask": 2,
                                                      "guidance_scale": 3.0}))
    result = edit(photo(), "a cat", "a dog", model=str(folder), seed=0, guidance_scale=2.0)
    assert result.params.num_inference_steps == 4 and result.params.num_maps_per_mask == 2
    assert result.params.guidance_scale == 2.0
    model = StableDiffusion.from_pretrained(folder)
    model.edit_defaults = {"no_such_field": 1}
    with pytest.raises(ValueError, match="diffedit.json"):
        DiffEditParams.for_model(model)


def test_missing_shipped_model_is_a_clear_error(monkeypatch, tmp_path):
    from diffedit import locations

    monkeypatch.setattr(locations, "SHIPPED_MODEL", tmp_path / "shapes-sd")
    with pytest.raises(ModelNotFoundError, match="ships with diffedit"):
        edit(photo(), "a cat", "a dog")
    with pytest.raises(TypeError, match="model must be"):
        api.load_model(3)


def test_pick_device_resolves_auto_and_refuses_what_is_not_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert api.pick_device() == (torch.device("cpu"), torch.float32)
    assert api.pick_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    for device, dtype, message in [("cuda", "auto", "no CUDA device"), ("mps", "auto", "no Apple GPU"),
                                   ("tpu", "auto", "expected auto, cpu, cuda or mps"),
                                   ("cpu", "float64", "expected auto, float32, float16 or bfloat16")]:
        with pytest.raises(ValueError, match=message):
            api.pick_device(device, dtype)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert api.pick_device() == (torch.device("cuda"), torch.float16)  # auto on a GPU: half precision


def test_size_notes_name_a_size_off_the_vae_grid_and_one_far_from_training(sd):
    f, native = sd.vae_scale_factor, sd.unet.config.sample_size * sd.vae_scale_factor
    assert api.size_notes(sd, (native, native)) == ((native, native), [])
    working, notes = api.size_notes(sd, (native + 1, native))
    assert working == (native, native) and len(notes) == 1 and f"not a multiple of {f}" in notes[0]
    assert api.size_notes(sd, (4 * native, native))[1] == []  # 4x the trained size: at the cut-off, no note
    far = api.size_notes(sd, (4 * native + f, native))[1]
    assert len(far) == 1 and "far from it" in far[0]


def test_prompt_warnings_name_over_long_and_empty_target_prompts(sd):
    room = sd.tokenizer.model_max_length - 2
    fits, over = " ".join(["a"] * room), " ".join(["a"] * (room + 3))
    assert api.prompt_warnings(sd, [("--source", fits), ("--target", "b")]) == []
    long, empty = api.prompt_warnings(sd, [("--source", over), ("--target 2", " ")])
    assert long.startswith(f"--source has {room + 3} tokens but the text encoder reads {room}: the last 3 are dropped")
    assert empty == "--target 2 is empty: the edit has no text to steer towards"
    assert api.prompt_warnings(sd, [("--source", "")]) == []  # an empty source is allowed: unconditional
    assert api.same_prompt(sd, "a cat", "A  cat") and not api.same_prompt(sd, "a cat", "a dog")


def test_an_edit_that_decodes_to_one_colour_is_an_error_unless_the_input_is_one_colour(sd, monkeypatch):
    from diffedit import method

    latents = torch.zeros(1, 4, 8, 8)
    monkeypatch.setattr(method, "to_pixels", lambda sd, x: torch.full((1, 3, 64, 64), 0.5))  # a flat picture
    busy, flat = torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64), torch.zeros(1, 3, 64, 64)
    with pytest.raises(method.ImpossibleResultError, match="one colour"):
        api.to_picture(sd, latents, (64, 64), source=busy)
    assert api.to_picture(sd, latents, (64, 64), source=flat).getextrema() == ((191, 191),) * 3
    almost = torch.full((1, 3, 64, 64), 0.5).index_fill(3, torch.tensor([0]), 0.4)
    monkeypatch.setattr(method, "to_pixels", lambda sd, x: almost)
    assert api.to_picture(sd, latents, (64, 64), source=busy).size == (64, 64)  # one column differs: a picture


def test_arguments_are_checked_by_name_before_the_model_loads(monkeypatch):
    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cases = [
        (dict(source=["a cat"]), TypeError, "source: expected a string"),
        (dict(target=None), TypeError, "target: expected a string"),
        (dict(seed=-1), ValueError, r"seed: expected None or an int in \[0, 2\*\*63\)"),
        (dict(seed=2**63), ValueError, "seed"),
        (dict(seed=1.5), ValueError, "seed"),
        (dict(seed=True), ValueError, "seed"),
        (dict(num_inference_steps=0), ValueError, "num_inference_steps: expected an int >= 1"),
        (dict(strenght=0.5), TypeError, "unknown DiffEdit parameter"),
        (dict(image=np.zeros((8, 8, 3), np.float32) + 2), ValueError, "image: float values"),
        (dict(preset="slow"), ValueError, "preset 'slow': choose from fast"),
        (dict(preset=1), TypeError, "preset: expected a preset name"),
        (dict(preset="fast", num_maps_per_mask=0), ValueError, "num_maps_per_mask: expected an int >= 1"),
    ]
    for change, error, message in cases:
        args = {"image": photo(), "source": "a cat", "target": "a dog", **change}
        with pytest.raises(error, match=message):
            edit(**args)
    with pytest.raises(ValueError, match="targets: expected at least one"):
        edit_targets(photo(), "a cat", [])
    with pytest.raises(TypeError, match=r"targets\[1\]: expected a string"):
        edit_targets(photo(), "a cat", ["a dog", 3])


def test_steps_that_do_not_fit_the_models_schedule_are_refused_before_work(sd, monkeypatch):
    from diffedit import method

    monkeypatch.setattr(method, "estimate_mask", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match="num_inference_steps=1001 does not fit the model's schedule"):
        edit(photo(), "a cat", "a dog", model=sd, num_inference_steps=1001)
    with pytest.raises(ValueError, match="inpaint_strength=0.001 .* runs no step"):
        edit(photo(), "a cat", "a dog", model=sd, inpaint_strength=0.001)
    monkeypatch.undo()
    assert edit(photo(), "a cat", "a dog", model=sd, seed=np.int64(3), **FAST).seed == 3  # numpy ints are ints


def test_a_given_mask_replaces_the_mask_step_and_is_put_on_the_grid_by_the_rule(sd, monkeypatch):
    from diffedit import method

    region = np.zeros((64, 64), bool)
    region[10:30, 20:50] = True
    estimated = method.estimate_mask
    monkeypatch.setattr(method, "estimate_mask", lambda *a, **k: pytest.fail("the mask step ran"))
    half = edit(photo(), "a cat", "a dog", model=sd, seed=0, mask=region, num_inference_steps=5)
    # 8 x 8 cells: rows 10-29 fill 6/8, 8/8, 6/8 of cell rows 1-3; columns 20-49 fill 4/8, 8/8, 8/8, 8/8, 2/8 of
    # cell columns 2-6. "half" keeps the cells at >= 1/2: full columns 3-5 of rows 1-3, and (2, 2) at 8/8 x 4/8
    grid = np.zeros((8, 8), bool)
    grid[1:4, 3:6] = grid[2, 2] = True
    assert np.array_equal(half.latent_mask, grid) and half.guidance_map is None
    anywhere = edit(photo(), "a cat", "a dog", model=sd, seed=0, mask=region, mask_rule="any", num_inference_steps=5)
    every = np.zeros((8, 8), bool)
    every[1:4, 2:7] = True  # "any": each cell the region touches
    assert np.array_equal(anywhere.latent_mask, every)
    monkeypatch.setattr(method, "estimate_mask", estimated)
    # the same picture as the per-target loop given that grid
    p = DiffEditParams.for_model(sd, num_inference_steps=5)
    pixels = api.model_pixels(sd, photo())
    picture, _, _ = next(api.edit_each(sd, pixels, (64, 64), api.prompt_text(sd, "a cat", p),
                                       [api.prompt_text(sd, "a dog", p)], p, torch.Generator().manual_seed(0), grid))
    assert np.array_equal(np.asarray(picture), np.asarray(half.image))
    with pytest.raises(ValueError, match="mask_rule: expected one of"):
        edit(photo(), "a cat", "a dog", model=sd, mask=region, mask_rule="most")


def test_step_one_parameters_with_a_given_mask_are_refused_not_ignored(sd, monkeypatch):
    """With mask= the mask step does not run, so a mask-step parameter would change nothing: refused by name before
    any work (a preset's own fields are not the user's and pass)."""
    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    region = np.ones((64, 64), bool)
    for name, value in [("num_maps_per_mask", 1), ("mask_thresholding_ratio", 1.1), ("mask_threshold_rule", "otsu"),
                        ("mask_encode_strength", 0.9)]:
        with pytest.raises(ValueError, match=f"{name}: step 1's parameter"):
            edit(photo(), "a cat", "a dog", model=sd, seed=0, mask=region, **{name: value})


def test_load_model_names_a_bad_device_or_dtype_and_never_ignores_them(sd):
    for kwargs, error, message in [(dict(device="bogus"), ValueError, "not a device name"),
                                   (dict(device=3), TypeError, "device: expected"),
                                   (dict(dtype=torch.int32), ValueError, "dtype torch.int32"),
                                   (dict(dtype="float8"), ValueError, "dtype 'float8'")]:
        with pytest.raises(error, match=message):
            api.load_model(sd, **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no such CUDA device"):
            api.load_model(device="cuda")
    assert api.load_model(sd, device="cpu", dtype="float32") is sd  # what it already is: as is
    with pytest.raises(ValueError, match="already loaded.*dtype torch.float16"):
        api.load_model(sd, dtype=torch.float16)  # was ignored: a float32 model came back


def test_a_preset_sits_between_the_models_stored_defaults_and_the_explicit_parameters(sd1_folder, tmp_path):
    """preset="fast" over a model folder's diffedit.json, under explicit fields; the edit equals one given those
    fields by hand."""
    folder = tmp_path / "model"
    shutil.copytree(sd1_folder, folder)
    (folder / "diffedit.json").write_text(json.dumps({"inpaint_strength": 0.6, "num_inference_steps": 25,
                                                      "num_maps_per_mask": 2}))
    model = StableDiffusion.from_pretrained(folder)
    result = edit(photo(), "a cat", "a dog", model=model, seed=1, preset="fast")
    p = result.params
    assert p.num_inference_steps == 15  # the preset over the stored 25
    assert p.inpaint_strength == 0.6 and p.num_maps_per_mask == 2  # stored, where the preset is silent
    explicit = edit(photo(), "a cat", "a dog", model=model, seed=1, preset="fast", num_inference_steps=5)
    assert explicit.params.num_inference_steps == 5  # explicit over the preset
    by_hand = edit(photo(), "a cat", "a dog", model=model, seed=1, num_inference_steps=15)
    assert by_hand.params == p and np.array_equal(np.asarray(by_hand.image), np.asarray(result.image))


def test_clip_skip_and_guidance_min_timestep_past_the_model_are_refused_before_work(sd, monkeypatch):
    """clip_skip past the text encoder's depth failed at run time (exit 1 and a half-made run folder in evaluate /
    experiment), guidance_min_timestep=10**30 with "int too big to convert": check_params_for_model, which every
    command calls before work, refuses both against the model."""
    monkeypatch.setattr(api, "model_pixels", lambda *a: pytest.fail("work started"))
    layers, train_steps = len(sd.text_encoder.encoder.layers), sd.scheduler.config.num_train_timesteps
    for change, message in [
        (dict(clip_skip=layers + 1), rf"clip_skip={layers + 1} is past the model's text encoder, which has {layers} "
                                     rf"layers: give None or 0 \.\. {layers}"),
        (dict(guidance_min_timestep=train_steps + 1),
         rf"guidance_min_timestep={train_steps + 1} is past the model's schedule: give 0 \.\. {train_steps} \(its "
         rf"num_train_timesteps; {train_steps} already guides no step"),
        (dict(guidance_min_timestep=10**30), r"guidance_min_timestep: expected an int in \[0, 2147483647\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            edit(photo(), "a cat", "a dog", model=sd, **change)
    api.check_params_for_model(sd, DiffEditParams(clip_skip=layers, guidance_min_timestep=train_steps))  # the ends


def test_an_empty_or_blank_target_is_warned_about_in_the_command_lines_words(sd, monkeypatch):
    """The command line warned "--target is empty", the API said nothing: now a UserWarning naming the argument as
    the API names it, in the same words, pointing at the caller's line, before any work."""
    monkeypatch.setattr(api, "model_pixels", lambda *a: pytest.fail("work started"))
    (cli_line,) = api.prompt_warnings(sd, [("--target", "")])
    for call, label in [(lambda: edit(photo(), "a cat", "", model=sd), "target"),
                        (lambda: edit(photo(), "a cat", "   ", model=sd), "target"),
                        (lambda: edit_targets(photo(), "a cat", ["a dog", " \n"], model=sd), "targets[1]")]:
        with pytest.warns(UserWarning) as record, pytest.raises(pytest.fail.Exception, match="work started"):
            call()
        assert [str(w.message) for w in record] == [cli_line.replace("--target", label, 1)]
        assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(pytest.fail.Exception, match="work started"):
            edit(photo(), "", "a dog", model=sd)  # an empty source is allowed: no warning


def test_numpy_parameters_run_as_the_python_numbers_they_equal(sd):
    """np.int64 steps and np.float32 scales were refused; result.params holds plain Python numbers."""
    result = edit(photo(), "a cat", "a dog", model=sd, seed=0, num_inference_steps=np.int64(5),
                  num_maps_per_mask=np.int32(2), mask_thresholding_ratio=np.float32(2.0))
    assert result.params == DiffEditParams.for_model(sd, **FAST)
    assert type(result.params.num_inference_steps) is int and type(result.params.mask_thresholding_ratio) is float


def test_a_given_mask_that_edits_no_latent_cell_is_warned_about_before_work(sd, monkeypatch):
    """The command line warns that an empty --mask gives the input back re-encoded; the API said nothing, for an
    empty mask and for a stroke that fills under half of every cell under mask_rule="half"."""
    monkeypatch.setattr(method, "invert", lambda *a, **k: pytest.fail("work started"))
    stroke = np.zeros((64, 64), bool)
    stroke[10:13, 10:40] = True  # 3 of each cell's 8 rows
    for region, rule, message in [
        (np.zeros((64, 64), np.float32), "half", "mask is empty: the output is the input, re-encoded"),
        (np.zeros((64, 64), bool), "any", "mask is empty"),
        (stroke, "half", r"mask covers no latent cell by mask_rule='half' .*mask_rule='any' edits every cell"),
    ]:
        with pytest.warns(UserWarning, match=message) as record, pytest.raises(pytest.fail.Exception):
            edit(photo(), "a cat", "a dog", model=sd, seed=0, mask=region, mask_rule=rule, num_inference_steps=5)
        assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(pytest.fail.Exception, match="work started"):
            edit(photo(), "a cat", "a dog", model=sd, seed=0, mask=stroke, mask_rule="any", num_inference_steps=5)


def test_mask_rule_without_a_given_mask_is_refused_not_ignored(monkeypatch):
    """mask_rule puts a given mask on the latent grid; without mask= it did nothing, silently."""
    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="mask_rule='any' puts a given mask on the latent grid, but no mask= is given"):
        edit(photo(), "a cat", "a dog", mask_rule="any")
    with pytest.raises(ValueError, match="mask_rule='any'"):
        edit_targets(photo(), "a cat", ["a dog"], mask_rule="any")
    with pytest.raises(pytest.fail.Exception, match="the model was loaded"):
        edit(photo(), "a cat", "a dog", mask_rule="half")  # the default, named
