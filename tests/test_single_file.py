"""Single-file (CompVis / LDM layout) checkpoints: `save_single_file` then `from_single_file` is exact; diffusers'
own `from_single_file` reads our files into the same weights and gives the same edits; at full size our key layout
is the one diffusers' converter reads; broken files get one error; the command line runs a single file."""

import json
import pickle
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffedit import DiffEditParams, StableDiffusion, StableDiffusionDiffEdit, save_single_file
from diffedit import checkpoint_file
from diffedit import official_configs as official
from diffedit.models import single_file as sf
from diffedit.models.clip_text import CLIPTextModel
from diffedit.models.config import CLIPTextConfig, UNetConfig, VAEConfig
from diffedit.models.tokenizer import CLIPTokenizer
from diffedit.models.unet import UNet2DConditionModel
from diffedit.models.vae import AutoencoderKL
from diffedit.models.weights import WeightsError
from diffedit.saved_inversion import InversionFileError, fingerprint_of, load_inversion, save_inversion
from parity import picture

torch.set_num_threads(1)

STEPS = 5
LATENT_TOL = 1e-3  # relative (Frobenius) error of latents against diffusers (test_facade.py's)
IMAGE_TOL = 5e-3  # max abs error of decoded images in [0, 1] against diffusers (test_facade.py's)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def converted(request, tmp_path_factory):
    """(style, diffusers folder, our model loaded from it, its single file, our model loaded from that file)."""
    folder = request.getfixturevalue(f"{request.param}_folder")
    ours = StableDiffusion.from_pretrained(folder)
    path = save_single_file(ours, tmp_path_factory.mktemp("single") / "model.safetensors")
    return request.param, folder, ours, path, StableDiffusion.from_single_file(path, config=folder)


def edit_outputs(pipe) -> tuple:
    """Mask, inverted latents and edited image of one compatible-mode edit (diffusers' call sequence)."""
    g = torch.Generator().manual_seed(5)
    image = picture(4)
    mask = pipe.generate_mask(image=image, source_prompt="a cat!", target_prompt="a dog", generator=g)
    inv = pipe.invert(prompt="a cat!", image=image, num_inference_steps=STEPS, generator=g)
    out = pipe(prompt="a dog", mask_image=mask, image_latents=inv.latents, num_inference_steps=STEPS, generator=g,
               output_type="np")
    return np.asarray(mask), np.asarray(inv.latents), np.asarray(out.images)


def components(sd: StableDiffusion) -> dict:
    return {"unet": sd.unet, "vae": sd.vae, "text_encoder": sd.text_encoder}


# ----------------------------------------------------------------------------------------------------------------
# Our round trip


def test_round_trip_gives_bitwise_identical_weights(converted):
    _, _, ours, _, loaded = converted
    for name, module in components(ours).items():
        a, b = module.state_dict(), components(loaded)[name].state_dict()
        assert list(a) == list(b), name
        for key in a:
            assert torch.equal(a[key], b[key]) and a[key].dtype == b[key].dtype, (name, key)


@pytest.mark.filterwarnings("ignore:prompt 1")  # the long prompt is cut, as it should be
def test_round_trip_takes_scheduler_tokenizer_and_defaults_from_the_config_folder(converted):
    style, folder, ours, path, loaded = converted
    assert loaded.scheduler.config == ours.scheduler.config
    assert loaded.inverse_scheduler.config == ours.inverse_scheduler.config
    assert loaded.scheduler.config.prediction_type == {"sd1": "epsilon", "sd2": "v_prediction"}[style]
    prompts = ["a cat!", "wow!! <|endoftext|> " + "word " * 80]
    assert torch.equal(loaded.tokenizer(prompts), ours.tokenizer(prompts))
    assert loaded.tokenizer.pad_token_id == {"sd1": 49407, "sd2": 0}[style]
    assert loaded.edit_defaults == ours.edit_defaults and loaded.folder == path.resolve()
    assert loaded.source == str(path)


def test_round_trip_gives_identical_edits(converted):
    _, _, ours, _, loaded = converted
    for a, b in zip(edit_outputs(StableDiffusionDiffEdit(ours)), edit_outputs(StableDiffusionDiffEdit(loaded))):
        assert np.array_equal(a, b)


def test_file_holds_the_original_layout_keys(converted):
    style, _, ours, path, _ = converted
    keys = set(load_file(str(path)))
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in keys  # upsampler after a plain level
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" not in keys  # the last level does not upsample
    assert load_file(str(path))["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # a 1x1 convolution
    if style == "sd1":
        assert "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight" in keys
    else:
        fused = load_file(str(path))["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]
        layer = ours.text_encoder.encoder.layers[1].self_attn
        assert torch.equal(fused, torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]))
    n_ours = sum(len(m.state_dict()) for m in components(ours).values())
    assert len(keys) == n_ours - (0 if style == "sd1" else 2 * 2 * len(ours.text_encoder.encoder.layers))


def test_from_pretrained_points_a_single_file_to_from_single_file(converted):
    from diffedit import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="is a single-file checkpoint: load it with .*from_single_file"):
        StableDiffusion.from_pretrained(converted[3])


def test_facade_from_single_file_is_the_loaded_model(converted):
    _, folder, ours, path, _ = converted
    pipe = StableDiffusionDiffEdit.from_single_file(path, config=folder, params=DiffEditParams())
    assert pipe.params == DiffEditParams()
    assert all(torch.equal(a, b) for a, b in zip(ours.unet.state_dict().values(),
                                                  pipe.model.unet.state_dict().values()))


def test_dtype_and_prediction_type_arguments(converted):
    _, folder, ours, path, _ = converted
    half = StableDiffusion.from_single_file(path, config=folder, dtype=torch.bfloat16, prediction_type="sample")
    assert half.dtype == torch.bfloat16 and half.text_encoder.dtype == torch.bfloat16
    assert torch.equal(half.unet.conv_in.weight, ours.unet.conv_in.weight.to(torch.bfloat16))
    assert half.scheduler.config.prediction_type == half.inverse_scheduler.config.prediction_type == "sample"
    with pytest.raises(ValueError, match="prediction_type must be None or one of epsilon, v_prediction, sample"):
        StableDiffusion.from_single_file(path, config=folder, prediction_type="v")


def test_prediction_type_keeps_the_config_folders_dpm_settings(converted, tmp_path):
    """prediction_type= rebuilt the scheduler configs with dataclasses.replace, which dropped the file's DPM-Solver++
    settings (not fields): sampler dpmsolver++ then ran 2nd order where the file says 3, a setting it refuses."""
    import json
    import shutil

    from diffedit.schedulers.dpm_solver import DPMSolverScheduler
    from diffedit.models.config import ConfigError

    _, folder, _, path, _ = converted
    third = tmp_path / "third-order"
    shutil.copytree(folder, third)
    config_file = third / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "solver_order": 3}))
    for prediction_type in (None, "epsilon"):
        sd = StableDiffusion.from_single_file(path, config=third, prediction_type=prediction_type)
        assert sd.scheduler.config.dpm_settings == (("solver_order", 3),)
        with pytest.raises((ValueError, ConfigError), match="solver_order=3 is not supported"):
            DPMSolverScheduler(sd.scheduler.config)


def test_save_single_file_in_float16_and_with_an_explicit_text_layout(converted, tmp_path):
    style, folder, ours, _, _ = converted
    path = save_single_file(ours, tmp_path / "half.safetensors", dtype=torch.float16)
    assert {t.dtype for t in load_file(str(path)).values()} == {torch.float16}
    loaded = StableDiffusion.from_single_file(path, config=folder)
    assert torch.equal(loaded.unet.conv_out.weight, ours.unet.conv_out.weight.half().float())
    other = "openai" if style == "sd2" else "openclip"  # the text layout is a naming choice: both round-trip
    again = StableDiffusion.from_single_file(save_single_file(ours, tmp_path / "other.safetensors", other),
                                             config=folder)
    assert all(torch.equal(a, b) for a, b in zip(ours.text_encoder.state_dict().values(),
                                                  again.text_encoder.state_dict().values()))
    with pytest.raises(ValueError, match="text_layout"):
        save_single_file(ours, tmp_path / "x.safetensors", "clip")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_single_file(ours, tmp_path / "x.ckpt")


# ----------------------------------------------------------------------------------------------------------------
# diffusers' from_single_file on the same file


def diffusers_from_single_file(path, folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                    safety_checker=None, feature_extractor=None,
                                                    requires_safety_checker=False)


def test_diffusers_from_single_file_reads_the_same_weights(converted):
    """diffusers 0.42.1 converts our file (with the folder's configs, offline) into exactly our tensors."""
    _, folder, ours, path, _ = converted
    ref = diffusers_from_single_file(path, folder)
    for name, module in components(ours).items():
        theirs = {k.removeprefix("text_model."): v for k, v in getattr(ref, name).state_dict().items()
                  if not k.endswith("position_ids")}
        mine = module.state_dict()
        assert set(theirs) == set(mine), name
        for key, value in mine.items():
            assert torch.equal(theirs[key].reshape(value.shape), value), (name, key)
    assert ref.scheduler.config.prediction_type == ours.scheduler.config.prediction_type


def test_prediction_type_keeps_the_schedule_where_diffusers_legacy_argument_does_not(converted):
    """diffusers' deprecated prediction_type= swaps in betas 0.02..0.085; ours changes the prediction type only."""
    from diffusers import StableDiffusionPipeline

    _, folder, ours, path, _ = converted
    with pytest.warns(FutureWarning):
        ref = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                       safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False, prediction_type="epsilon")
    assert (ref.scheduler.config.beta_start, ref.scheduler.config.beta_end) == (0.02, 0.085)
    loaded = StableDiffusion.from_single_file(path, config=folder, prediction_type="epsilon")
    expected = ours.scheduler.config
    assert (loaded.scheduler.config.beta_start, loaded.scheduler.config.beta_end) == (expected.beta_start,
                                                                                      expected.beta_end)
    assert loaded.scheduler.config.prediction_type == ref.scheduler.config.prediction_type == "epsilon"


def test_edit_matches_diffusers_loaded_from_the_same_file(converted):
    """diffusers' DiffEdit pipeline has no from_single_file: it is built from the components its
    StableDiffusionPipeline.from_single_file loads. Measured: masks equal, latents 8e-6 relative, images 3e-5 (SD1)
    and 7e-6 (SD2) max abs."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline

    _, folder, _, path, loaded = converted
    base = diffusers_from_single_file(path, folder)
    scheduler = DDIMScheduler.from_config(base.scheduler.config)
    ref = StableDiffusionDiffEditPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet, scheduler=scheduler,
        inverse_scheduler=DDIMInverseScheduler.from_config(scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    (m_ref, l_ref, i_ref), (m, l, i) = edit_outputs(ref), edit_outputs(StableDiffusionDiffEdit(loaded))
    assert (m == m_ref).mean() >= 0.99 and 0 < m_ref.mean() < 1
    assert np.linalg.norm(l - l_ref) / np.linalg.norm(l_ref) < LATENT_TOL
    assert i.shape == i_ref.shape == (1, 64, 64, 3) and np.abs(i - i_ref).max() < IMAGE_TOL


# ----------------------------------------------------------------------------------------------------------------
# Full size, without weights: our layout is the one diffusers' converter reads


def meta_modules(unet: dict, text: dict) -> dict:
    with torch.device("meta"):
        return {"unet": UNet2DConditionModel(UNetConfig.from_dict(unet)),
                "vae": AutoencoderKL(VAEConfig.from_dict(official.SD_VAE)),
                "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(text))}


def diffusers_converted(file: dict, unet: dict, text: dict, layout: str) -> tuple[dict, dict]:
    """diffusers' converters run on a single file's (meta) tensors; with the reference models' state dicts."""
    import diffusers
    import transformers
    from diffusers.loaders import single_file_utils as su

    clean = lambda raw: {k: v for k, v in raw.items() if not k.startswith("_") and k not in ("architectures",
                                                                                             "model_type")}
    with torch.device("meta"):
        reference = {"unet": diffusers.UNet2DConditionModel(**clean(unet)),
                     "vae": diffusers.AutoencoderKL(**clean(official.SD_VAE)),
                     "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**clean(text)))}
    converted = {"unet": su.convert_ldm_unet_checkpoint(file, unet),
                 "vae": su.convert_ldm_vae_checkpoint(file, official.SD_VAE),
                 "text_encoder": (su.convert_ldm_clip_checkpoint(file) if layout == "openai"
                                  else su.convert_open_clip_checkpoint(reference["text_encoder"], file))}
    strip = lambda state: {k.removeprefix("text_model."): tuple(v.shape) for k, v in state.items()
                           if not k.endswith("position_ids")}
    return ({name: strip(state) for name, state in converted.items()},
            {name: strip(module.state_dict()) for name, module in reference.items()})


@pytest.mark.parametrize("unet, text, layout", [(official.SD15_UNET, official.SD15_TEXT, "openai"),
                                                (official.SD21_UNET, official.SD21_TEXT, "openclip")],
                         ids=["sd15", "sd21"])
def test_full_size_layout_is_what_diffusers_converter_reads(unet, text, layout):
    """SD 1.5 / SD 2.1 on the meta device: the file we write converts, by diffusers 0.42.1's code, to exactly its
    models' keys and shapes; our reader takes it back, and also takes what the official files hold besides."""
    modules = meta_modules(unet, text)
    file = sf.join_state({name: m.state_dict() for name, m in modules.items()}, modules, layout)
    fused = 4 * text["num_hidden_layers"] if layout == "openclip" else 0  # 6 q/k/v keys -> 2 in_proj keys a layer
    assert len(file) == sum(len(m.state_dict()) for m in modules.values()) - fused
    converted, reference = diffusers_converted(file, unet, text, layout)
    for name in modules:
        assert converted[name] == reference[name], name
        assert len(converted[name]) == len(modules[name].state_dict())
    assert sf.is_sd2(file) is (layout == "openclip")  # diffusers' family rule picks the matching official config
    back = sf.split_state(file, modules, "file")
    assert {n: set(s) for n, s in back.items()} == {n: set(m.state_dict()) for n, m in modules.items()}
    # The official files also hold the schedule's buffers, EMA copies, CLIP's position_ids and, in SD 2.x,
    # OpenCLIP's 24th block, text_projection and logit_scale: read past, as diffusers' converter does.
    extras = {"betas": torch.empty(1000, device="meta"), "model_ema.decay": torch.empty((), device="meta"),
              "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.empty(1, 77, device="meta")}
    if layout == "openclip":
        last = f"{sf.OPEN_CLIP_PREFIX}transformer.resblocks.23."
        extras.update({last + "attn.in_proj_weight": torch.empty(3072, 1024, device="meta"),
                       last + "mlp.c_fc.bias": torch.empty(4096, device="meta"),
                       sf.OPEN_CLIP_PREFIX + "text_projection": torch.empty(1024, 1024, device="meta"),
                       sf.OPEN_CLIP_PREFIX + "logit_scale": torch.empty((), device="meta")})
    sf.split_state({**file, **extras}, modules, "file")
    assert diffusers_converted({**file, **extras}, unet, text, layout)[0] == converted


def test_sd2_family_rule_is_diffusers_cross_attention_width():
    probe = sf.SD2_PROBE
    assert sf.is_sd2({probe: torch.empty(640, 1024, device="meta")})
    assert not sf.is_sd2({probe: torch.empty(640, 768, device="meta")}) and not sf.is_sd2({})


# ----------------------------------------------------------------------------------------------------------------
# Without a config folder


def test_without_config_the_official_sd15_shapes_are_expected(sd1_folder, tmp_path):
    """The tiny file is SD 1.x by diffusers' rule, so SD 1.5's shapes are checked, and refused in one message."""
    path = save_single_file(StableDiffusion.from_pretrained(sd1_folder), tmp_path / "m.safetensors")
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_single_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path} (read as SD 1.x with its official configs: for other shapes give its diffusers "
                          "config folder): not a single-file checkpoint of this model")
    assert "mis-shaped: " in msg and "encoder.layers.0.mlp.fc1.weight (37, 32) != (3072, 768)" in msg


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_without_config_each_family_gets_its_official_parts(style, request, tmp_path, monkeypatch):
    """With the official tables pointed at the tiny configs (full-size weights are gigabytes), the family rule,
    tokenizer padding and prediction type without a config are those of SD 1.5 / SD 2.1."""
    folder = request.getfixturevalue(f"{style}_folder")
    ours = StableDiffusion.from_pretrained(folder)
    path = save_single_file(ours, tmp_path / "m.safetensors")
    raw = {name: json.loads((folder / name / "config.json").read_text()) for name in ("unet", "vae", "text_encoder")}
    family = {"sd1": "SD 1.x", "sd2": "SD 2.x"}[style]
    _, _, _, scheduler, pad = checkpoint_file._OFFICIAL[family]
    monkeypatch.setitem(checkpoint_file._OFFICIAL, family,
                        (raw["unet"], raw["vae"], raw["text_encoder"], scheduler, pad))
    monkeypatch.setattr(checkpoint_file, "is_sd2", lambda state: style == "sd2")  # the tiny UNet is 32 wide
    loaded = StableDiffusion.from_single_file(path)
    assert torch.equal(loaded.unet.conv_in.weight, ours.unet.conv_in.weight)
    expected = {"sd1": ("epsilon", 49407), "sd2": ("v_prediction", 0)}[style]
    assert (loaded.scheduler.config.prediction_type, loaded.tokenizer.pad_token_id) == expected
    assert loaded.scheduler.config.beta_start == 0.00085 and loaded.scheduler.config.steps_offset == 1
    assert loaded.edit_defaults == {}
    base = StableDiffusion.from_single_file(path, prediction_type="epsilon")  # SD 2 base (512 px) is epsilon
    assert base.scheduler.config.prediction_type == base.inverse_scheduler.config.prediction_type == "epsilon"


@pytest.mark.filterwarnings("ignore:prompt 3")  # the long prompt is cut, as it should be
def test_sd2_default_tokenizer_is_the_sd2_tokenizer(sd2_folder):
    """CLIPTokenizer.default(pad_token="!") gives the ids of SD 2.x's tokenizer folder, read by transformers."""
    from transformers import CLIPTokenizer as Reference

    ref = Reference.from_pretrained(sd2_folder / "tokenizer")
    prompts = ["a cat!", "hello !! world", "<|endoftext|> x", "big " * 90]
    expected = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(CLIPTokenizer.default(pad_token="!")(prompts), expected)
    assert CLIPTokenizer.default(pad_token="!").pad_token_id == 0


# ----------------------------------------------------------------------------------------------------------------
# Broken files


@pytest.fixture(scope="module")
def sd1_file(sd1_folder, tmp_path_factory):
    return save_single_file(StableDiffusion.from_pretrained(sd1_folder),
                            tmp_path_factory.mktemp("broken") / "good.safetensors")


def edited_copy(path, tmp_path, change) -> object:
    state = load_file(str(path))
    change(state)
    out = tmp_path / "bad.safetensors"
    save_file(state, str(out))
    return out


CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
VAE_Q = "first_stage_model.decoder.mid.attn_1.q.weight"


@pytest.mark.parametrize("change, fragments", [
    (lambda s: s.pop(CONV_IN), [f"missing: {CONV_IN}"]),
    (lambda s: s.update({"model.diffusion_model.extra.weight": torch.zeros(1)}),
     ["unexpected: model.diffusion_model.extra.weight"]),
    (lambda s: s.update({VAE_Q: torch.zeros(16, 16, 3, 3)}), [f"mis-shaped: {VAE_Q} (16, 16, 3, 3) != (16, 16, 1, 1)"]),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("cond_stage_model.")],
     ["the file has UNet + VAE, no text encoder", "missing: cond_stage_model.transformer.text_model.embeddings."]),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("cond_stage_model.")]
     + [s.update({"cond_stage_model.model.positional_embedding": torch.zeros(77, 32)})],
     ["the file has UNet + VAE, OpenCLIP, OpenCLIP text encoder expected",
      "missing: cond_stage_model.model.ln_final.bias"]),
], ids=["missing", "extra", "shape", "no-text-encoder", "text-encoder-cut"])
def test_broken_file_is_one_weights_error_naming_the_keys(sd1_file, sd1_folder, tmp_path, change, fragments):
    bad = edited_copy(sd1_file, tmp_path, change)
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_single_file(bad, config=sd1_folder)
    assert str(e.value).startswith(f"{bad}: not a single-file checkpoint of this model")
    for fragment in fragments:
        assert fragment in str(e.value)


def test_every_problem_is_listed_at_once(sd1_file, sd1_folder, tmp_path):
    def change(s):
        s.pop(CONV_IN)
        s["junk"] = torch.zeros(1)
        s[VAE_Q] = torch.zeros(3)

    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_single_file(edited_copy(sd1_file, tmp_path, change), config=sd1_folder)
    lines = str(e.value).splitlines()
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["missing", "unexpected", "mis-shaped"]


def test_non_finite_weight_is_refused(sd1_file, sd1_folder, tmp_path):
    bad = edited_copy(sd1_file, tmp_path, lambda s: s[VAE_Q].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(WeightsError, match=r"\(vae\): non-finite values .* decoder.mid_block.attentions.0.to_q"):
        StableDiffusion.from_single_file(bad, config=sd1_folder)


def test_integer_and_bool_weights_are_refused_naming_the_files_keys_and_dtypes(sd1_file, sd1_folder, tmp_path):
    """They used to escape from load_state_dict as torch's "Only Tensors of floating point ... can require
    gradients"; now they are one more line of the file's one error, with the other problems."""
    text_key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"

    def change(s):
        s[CONV_IN] = s[CONV_IN].to(torch.int32)
        s[text_key] = s[text_key].bool()
        s.pop(VAE_Q)

    bad = edited_copy(sd1_file, tmp_path, change)
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_single_file(bad, config=sd1_folder)
    lines = str(e.value).splitlines()
    assert lines[0].startswith(f"{bad}: not a single-file checkpoint of this model")
    assert lines[1:] == [f"  missing: {VAE_Q}",
                         f"  weights the model holds in floating point are stored as integers or bools: {text_key} "
                         f"(bool), {CONV_IN} (int32); a damaged or mislabelled file (save them as float32, float16 "
                         "or bfloat16)"]
    # with every key and shape right, the file is this model's, damaged: one line that says so (its heading
    # called it "not a single-file checkpoint of this model")
    (tmp_path / "only").mkdir()
    only = edited_copy(sd1_file, tmp_path / "only", lambda s: s.__setitem__(CONV_IN, s[CONV_IN].to(torch.int32)))
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_single_file(only, config=sd1_folder)
    assert str(e.value) == (f"{only}: its keys and shapes are this model's, but the weights the model holds in "
                            f"floating point are stored as integers or bools: {CONV_IN} (int32); a damaged or "
                            "mislabelled file (save them as float32, float16 or bfloat16)")


def test_pickle_truncated_and_missing_files_are_refused(sd1_file, sd1_folder, tmp_path):
    class Trap:
        def __reduce__(self):  # unpickling this would create the marker file
            return (open, (str(tmp_path / "unpickled"), "w"))

    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(pickle.dumps({"state_dict": Trap()}))
    with pytest.raises(WeightsError, match=r"model.ckpt is a pickle checkpoint; .* convert it to .safetensors"):
        StableDiffusion.from_single_file(ckpt, config=sd1_folder)
    assert not (tmp_path / "unpickled").exists()
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(sd1_file.read_bytes()[: sd1_file.stat().st_size // 2])
    with pytest.raises(WeightsError, match="cut.safetensors is truncated or corrupt"):
        StableDiffusion.from_single_file(truncated, config=sd1_folder)
    with pytest.raises(WeightsError, match="missing weight file"):
        StableDiffusion.from_single_file(tmp_path / "none.safetensors", config=sd1_folder)


def _sdxl(s):  # the UNet and VAE stay; SDXL's two text encoders and its added-conditioning embedding
    for k in [k for k in s if k.startswith("cond_stage_model.")]:
        s["conditioner.embedders.0.transformer." + k.removeprefix("cond_stage_model.transformer.")] = s.pop(k)
    s["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(32, 8)


def _sd3(s):
    s.clear()
    s.update({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(96, 32),
              "first_stage_model.decoder.conv_in.weight": torch.zeros(32, 16, 3, 3),
              "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.zeros(32)})


def _inpainting(s):  # 9 input channels: the latents, the mask and the masked image's latents
    s[CONV_IN] = torch.cat([s[CONV_IN], torch.zeros(s[CONV_IN].shape[0], 5, 3, 3)], dim=1)


def _vae_alone(s):  # as the community's standalone VAE files are: the original layout without first_stage_model.
    for k in list(s):
        value = s.pop(k)
        if k.startswith(sf.VAE_PREFIX):
            s[k.removeprefix(sf.VAE_PREFIX)] = value


def _wrapped(prefix):
    return lambda s: s.update({prefix + k: s.pop(k) for k in list(s)})


def _lora(s):
    s.clear()
    s.update({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3),
              "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 4, 1, 1)})


@pytest.mark.parametrize("change, what", [
    (_sdxl, "is an SDXL checkpoint"), (_sd3, "is an SD 3 checkpoint"),
    (_inpainting, "is an inpainting checkpoint (its UNet takes 9 input channels, its VAE gives 4)"),
    (_vae_alone, "is a VAE on its own"), (_wrapped("state_dict."), "every key under a state_dict. prefix"),
    (_wrapped("module."), "every key under a module. prefix"), (_lora, "is a LoRA file: load it onto a model with"),
    (lambda s: s.clear(), "is empty"),
], ids=["sdxl", "sd3", "inpainting", "vae", "state_dict", "module", "lora", "empty"])
@pytest.mark.parametrize("with_config", [True, False])
def test_other_kinds_of_file_are_refused_in_one_line_naming_what_they_are(sd1_file, sd1_folder, tmp_path, change, what,
                                                                         with_config):
    """They were "not a single-file checkpoint of this model" and lists of hundreds of missing and unexpected keys
    (the inpainting UNet: one mis-shaped conv_in; a standalone VAE: "the file has no UNet or VAE"). diffusers 0.42.1
    refuses each of them too."""
    bad = edited_copy(sd1_file, tmp_path, change)
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_single_file(bad, config=sd1_folder if with_config else None)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(bad)) and what in message
    assert message.endswith("from_single_file reads one SD 1.x / 2.x text-to-image checkpoint (UNet, VAE and text "
                            "encoder under model.diffusion_model., first_stage_model. and cond_stage_model.)")


def test_an_sd1_file_with_an_sd2_config_is_refused_by_its_projections(sd1_file, sd1_folder, sd2_folder, tmp_path):
    """The tiny SD 1.x and SD 2.x models have equal widths, and a 1x1 convolution was accepted for a linear
    projection, so the SD 1.x weights loaded into the SD 2.x config's model (gelu text encoder, upcast attention,
    v-prediction) without a word. diffusers refuses the file by its proj_in shape; so do we now, both ways round."""
    proj_in = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_single_file(sd1_file, config=sd2_folder)
    assert f"mis-shaped: {proj_in} (32, 32, 1, 1) != (32, 32)" in str(e.value)
    sd2_file = save_single_file(StableDiffusion.from_pretrained(sd2_folder), tmp_path / "sd2.safetensors")
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_single_file(sd2_file, config=sd1_folder)
    assert f"mis-shaped: {proj_in} (32, 32) != (32, 32, 1, 1)" in str(e.value)


def test_original_checkpoint_extras_are_read_past(sd1_file, sd1_folder, tmp_path):
    def change(s):
        s.update({"betas": torch.rand(1000), "alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9),
                  "model_ema.diffusion_modelinput_blocks00weight": torch.rand(3),
                  "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]})

    loaded = StableDiffusion.from_single_file(edited_copy(sd1_file, tmp_path, change), config=sd1_folder)
    assert torch.equal(loaded.unet.conv_in.weight, load_file(str(sd1_file))[CONV_IN])


def test_openai_clip_keys_without_text_model_level_load(sd1_file, sd1_folder, tmp_path):
    """Files written with old transformers name the text encoder `cond_stage_model.transformer.encoder...`."""
    old = edited_copy(sd1_file, tmp_path, lambda s: s.update(
        {k.replace(".text_model.", ".", 1): s.pop(k) for k in list(s) if k.startswith(sf.OPENAI_CLIP_PREFIX)}))
    assert not any(".text_model." in k for k in load_file(str(old)))
    loaded = StableDiffusion.from_single_file(old, config=sd1_folder)
    expected = load_file(str(sd1_file))[sf.OPENAI_CLIP_PREFIX + "final_layer_norm.weight"]
    assert torch.equal(loaded.text_encoder.final_layer_norm.weight, expected)


def test_sd2_file_with_openclip_last_block_and_projection_loads(sd2_folder, tmp_path):
    """The official SD 2.x files carry one OpenCLIP block more than the model runs, and text_projection."""
    ours = StableDiffusion.from_pretrained(sd2_folder)
    path = save_single_file(ours, tmp_path / "m.safetensors")
    n = len(ours.text_encoder.encoder.layers)
    prefix = f"{sf.OPEN_CLIP_PREFIX}transformer.resblocks."
    extra = {k.replace(f"{prefix}0.", f"{prefix}{n}."): v.clone() for k, v in load_file(str(path)).items()
             if k.startswith(f"{prefix}0.")}
    full = edited_copy(path, tmp_path, lambda s: s.update({**extra, sf.OPEN_CLIP_PREFIX + "text_projection":
                                                           torch.rand(32, 32),
                                                           sf.OPEN_CLIP_PREFIX + "logit_scale": torch.tensor(4.6)}))
    loaded = StableDiffusion.from_single_file(full, config=sd2_folder)
    assert len(loaded.text_encoder.encoder.layers) == n
    ids = ours.tokenizer(["a cat"])
    assert torch.equal(loaded.text_encoder(ids), ours.text_encoder(ids))
    two_more = edited_copy(full, tmp_path, lambda s: s.update(
        {k.replace(f"{prefix}{n}.", f"{prefix}{n + 1}."): v for k, v in extra.items()}))
    with pytest.raises(WeightsError, match=f"unexpected: {prefix}{n + 1}.attn.in_proj_bias"):
        StableDiffusion.from_single_file(two_more, config=sd2_folder)


# ----------------------------------------------------------------------------------------------------------------
# Saved inversions and the command line


def test_saved_inversion_fingerprint_of_a_single_file(converted, tmp_path):
    from diffedit import method

    _, folder, _, path, loaded = converted
    copy = shutil.copy(path, tmp_path / "copy.safetensors")
    same = StableDiffusion.from_single_file(copy, config=folder)
    assert fingerprint_of(same) == fingerprint_of(loaded)  # a copy of the file is the same model
    other = StableDiffusion.from_single_file(path, config=folder, prediction_type="sample")
    assert fingerprint_of(other) != fingerprint_of(loaded)  # other configs give other latents
    p = DiffEditParams(num_inference_steps=STEPS)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    inversion = method.invert(loaded, pixels, method.encode_text(loaded, ["a cat"], [""]), p,
                              torch.Generator().manual_seed(0))
    meta = save_inversion(tmp_path / "lat.safetensors", inversion, model=loaded, params=p, image_size=(64, 64))
    assert meta["model"] == str(path.resolve())
    back, _ = load_inversion(tmp_path / "lat.safetensors", model=same)
    assert torch.equal(back.latents, inversion.latents)
    with pytest.raises(InversionFileError, match="inverted with another model"):
        load_inversion(tmp_path / "lat.safetensors", model=other)


@pytest.fixture
def diffedit(capsys, monkeypatch):
    """The `diffedit` command run in this process (the same `cli.main` as the console script): (status, stderr)."""
    from diffedit import cli

    def run(*args, cwd):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        status = cli.main([str(a) for a in args])
        return status, capsys.readouterr().err

    return run


def assert_bad_input(result: tuple, *fragments: str) -> None:
    """Exit status 2 and one line on stderr holding every fragment (test_cli.py's contract)."""
    status, err = result
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(f in lines[0] for f in fragments), (fragments, lines[0])


def test_cli_invert_then_edit_with_a_single_file_model(sd2_folder, tmp_path, diffedit):
    ours = StableDiffusion.from_pretrained(sd2_folder)
    save_single_file(ours, tmp_path / "m.safetensors")
    picture(1).save(tmp_path / "in.png")
    model = ["--model", "m.safetensors", "--config", sd2_folder, "--steps", "4"]
    invert = diffedit("invert", "in.png", "--prompt", "a cat", "-o", "lat.safetensors", *model, cwd=tmp_path)
    assert invert[0] == 0, invert[1]
    # No --model: the latents file names the single file it was inverted with; --config goes with it
    edit = diffedit("edit", "in.png", "--latents", "lat.safetensors", "--target", "a dog", "-o", "out.png",
                    "--source", "a cat", "--num-maps", "2", "--config", sd2_folder, cwd=tmp_path)
    assert edit[0] == 0, edit[1]
    assert PIL.Image.open(tmp_path / "out.png").size == (64, 64)
    # Without --config the tiny file is read with SD 1.5's configs, which it does not fit: one line
    assert_bad_input(diffedit("edit", "in.png", "--latents", "lat.safetensors", "--target", "a dog", "-o", "o.png",
                              "--source", "a cat", "--model", "m.safetensors", cwd=tmp_path),
                     "cannot load model m.safetensors", "read as SD 1.x with its official configs")


def test_cli_refuses_pickles_and_misplaced_config(sd1_folder, tmp_path, diffedit):
    picture(1).save(tmp_path / "in.png")
    (tmp_path / "m.ckpt").write_bytes(b"pickle bytes")
    base = ["edit", "in.png", "--source", "a", "--target", "b", "-o", "o.png", "--steps", "4"]
    assert_bad_input(diffedit(*base, "--model", "m.ckpt", cwd=tmp_path), "m.ckpt is a pickle checkpoint",
                     "convert it to .safetensors")
    assert_bad_input(diffedit(*base, "--model", sd1_folder, "--config", sd1_folder, cwd=tmp_path),
                     "--config goes with a single-file .safetensors --model")
    assert_bad_input(diffedit(*base, "--model", "none.safetensors", cwd=tmp_path),
                     "model file none.safetensors does not exist")
    assert not (tmp_path / "o.png").exists()


def test_api_load_model_reads_a_single_file_with_the_official_configs(sd1_file):
    from diffedit.api import load_model

    with pytest.raises(WeightsError, match=r"read as SD 1.x with its official configs"):
        load_model(str(sd1_file))


def test_a_config_folder_needs_no_weights_and_a_broken_one_is_named_before_the_file_is_read(sd1_folder, sd1_file,
                                                                                            tmp_path):
    from diffedit.models.config import ConfigError

    folder = shutil.copytree(sd1_folder, tmp_path / "cfg", ignore=shutil.ignore_patterns("*.safetensors"))
    assert StableDiffusion.from_single_file(sd1_file, config=folder).scheduler.config.prediction_type == "epsilon"
    (folder / "unet" / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="unet/config.json is not valid JSON"):
        StableDiffusion.from_single_file(tmp_path / "not-even-there.safetensors", config=folder)
