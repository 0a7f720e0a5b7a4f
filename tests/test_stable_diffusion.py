"""Loading a diffusers-layout folder (or a hub repo id) gives components equal to the reference's on the same files."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffedit import ModelNotFoundError, StableDiffusion
from diffedit.models.config import ConfigError
from diffedit.models.weights import WeightsError

PROMPTS = ["a photo of a cat", "", "A RED Circle, on a gray background!"]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def reference(folder):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return dict(
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
        unet=UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
        vae=AutoencoderKL.from_pretrained(folder / "vae").eval(),
    )


@pytest.mark.parametrize("style", ["sd1", "sd2"])
@torch.no_grad()
def test_loaded_components_equal_reference_on_same_folder(style, request):
    folder = request.getfixturevalue(f"{style}_folder")
    sd = StableDiffusion.from_pretrained(folder)
    ref = reference(folder)

    ids = sd.tokenizer(PROMPTS)
    ref_ids = ref["tokenizer"](PROMPTS, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
    assert torch.equal(ids, ref_ids)

    text = sd.text_encoder(ids)
    ref_text = ref["text_encoder"](ref_ids)[0]
    assert rel_err(text, ref_text) < 1e-4

    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([981, 500, 1])
    assert rel_err(sd.unet(latents, t, text), ref["unet"](latents, t, ref_text).sample) < 1e-4

    images = torch.rand(3, 3, 64, 64, generator=gen) * 2 - 1
    post, ref_post = sd.vae.encode(images), ref["vae"].encode(images).latent_dist
    assert rel_err(post.mean, ref_post.mean) < 1e-4 and rel_err(post.std, ref_post.std) < 1e-4
    assert rel_err(sd.vae.decode(latents), ref["vae"].decode(latents).sample) < 1e-4
    assert sd.vae_scale_factor == 8


def test_scheduler_comes_from_folder_and_inverse_is_built_from_it(sd2_folder):
    sd = StableDiffusion.from_pretrained(sd2_folder)
    assert sd.scheduler.config.prediction_type == "v_prediction"
    assert sd.inverse_scheduler.config.prediction_type == "v_prediction"
    assert sd.scheduler.timesteps(50).tolist()[:2] == [981, 961]
    assert sd.inverse_scheduler.timesteps(50).tolist()[:2] == [1, 21]


def test_fp16_stored_weights_load_into_float32_and_bfloat16(sd1_folder, tmp_path):
    folder = shutil.copytree(sd1_folder, tmp_path / "m")
    f = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.half() for k, v in load_file(f).items()}, f)
    sd32 = StableDiffusion.from_pretrained(folder)
    assert sd32.unet.conv_in.weight.dtype == torch.float32
    expected = load_file(f)["conv_in.weight"].float()
    assert torch.equal(sd32.unet.conv_in.weight, expected)
    sd16 = StableDiffusion.from_pretrained(folder, dtype=torch.bfloat16)
    assert sd16.dtype == torch.bfloat16 and sd16.text_encoder.final_layer_norm.weight.dtype == torch.bfloat16


def test_variant_files_are_preferred_when_asked(sd1_folder, tmp_path):
    folder = shutil.copytree(sd1_folder, tmp_path / "m")
    for name, base in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        f = folder / name / f"{base}.safetensors"
        state = load_file(f)
        save_file({k: v.half() for k, v in state.items()}, folder / name / f"{base}.fp16.safetensors")
    sd = StableDiffusion.from_pretrained(folder, variant="fp16")
    assert torch.equal(sd.unet.conv_in.weight, load_file(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
                       ["conv_in.weight"].float())
    with pytest.raises(WeightsError, match="no 'bf16' variant"):
        StableDiffusion.from_pretrained(folder, variant="bf16")


def test_text_encoder_keys_load_with_or_without_text_model_prefix(sd1_folder, tmp_path):
    folder = shutil.copytree(sd1_folder, tmp_path / "m")
    f = folder / "text_encoder" / "model.safetensors"
    state = load_file(f)
    prefixed = any(k.startswith("text_model.") for k in state)
    flipped = ({k.removeprefix("text_model."): v for k, v in state.items()} if prefixed
               else {f"text_model.{k}": v for k, v in state.items()})
    flipped["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(flipped, f)
    a = StableDiffusion.from_pretrained(sd1_folder).text_encoder.final_layer_norm.weight
    b = StableDiffusion.from_pretrained(folder).text_encoder.final_layer_norm.weight
    assert torch.equal(a, b)


def test_legacy_vae_attention_names_load(sd1_folder, tmp_path):
    folder = shutil.copytree(sd1_folder, tmp_path / "m")
    f = folder / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in load_file(f).items():
        for new, old in legacy.items():
            if ".attentions.0." in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
        state[k] = v
    assert any(".query." in k for k in state)
    save_file(state, f)
    ours = StableDiffusion.from_pretrained(folder).vae
    ref = StableDiffusion.from_pretrained(sd1_folder).vae
    x = torch.rand(1, 4, 8, 8)
    assert torch.equal(ours.decode(x), ref.decode(x))


def test_missing_unexpected_and_misshaped_keys_fail_in_one_message(sd1_folder, tmp_path):
    folder = shutil.copytree(sd1_folder, tmp_path / "m")
    f = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    del state["conv_in.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["conv_out.bias"] = torch.zeros(5)
    save_file(state, f)
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_pretrained(folder)
    msg = str(e.value)
    assert "unet/" in msg and "missing: conv_in.bias" in msg and "unexpected: extra.weight" in msg
    assert "mis-shaped: conv_out.bias (5,) != (4,)" in msg


@pytest.mark.parametrize("component, key, value", [("unet", "conv_in.bias", float("nan")),
                                                   ("vae", "decoder.conv_out.weight", float("inf")),
                                                   ("text_encoder", "final_layer_norm.weight", float("-inf"))])
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(sd1_folder, tmp_path, component, key, value):
    folder = shutil.copytree(sd1_folder, tmp_path / "m")
    f = next((folder / component).glob("*.safetensors"))
    state = load_file(f)
    state[key] = state[key].clone()
    state[key].view(-1)[-1] = value  # one value of one tensor is enough
    save_file(state, f)
    with pytest.raises(WeightsError, match=f"{component}/: non-finite values .* in .*{key}"):
        StableDiffusion.from_pretrained(folder)


def test_float32_weights_too_large_for_float16_are_refused_in_float16_only(sd1_folder, tmp_path):
    folder = shutil.copytree(sd1_folder, tmp_path / "m")
    f = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    state["conv_out.bias"] = torch.full_like(state["conv_out.bias"], 70000.0)  # float16 tops out at 65504
    save_file(state, f)
    StableDiffusion.from_pretrained(folder)  # float32: fine
    with pytest.raises(WeightsError, match="conv_out.bias: .*too large for float16"):
        StableDiffusion.from_pretrained(folder, dtype=torch.float16)


def test_truncated_weight_file_is_named(sd1_folder, tmp_path):
    folder = shutil.copytree(sd1_folder, tmp_path / "m")
    f = folder / "vae" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.safetensors is truncated or corrupt"):
        StableDiffusion.from_pretrained(folder)


def test_pickle_only_weights_are_refused_without_unpickling(sd1_folder, tmp_path):
    folder = shutil.copytree(sd1_folder, tmp_path / "m")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(WeightsError, match="only pickle weights .*safetensors only"):
        StableDiffusion.from_pretrained(folder)


def test_unsupported_config_value_names_the_field(sd1_folder, tmp_path):
    folder = shutil.copytree(sd1_folder, tmp_path / "m")
    cfg = folder / "unet" / "config.json"
    raw = json.loads(cfg.read_text())
    raw["class_embed_type"] = "timestep"
    cfg.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="class_embed_type"):
        StableDiffusion.from_pretrained(folder)
    raw["class_embed_type"] = None
    raw["made_up_field"] = 3
    cfg.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="unknown field 'made_up_field'"):
        StableDiffusion.from_pretrained(folder)


def test_missing_folder_or_component_is_one_clear_error(sd1_folder, tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        StableDiffusion.from_pretrained(tmp_path / "nope")
    folder = shutil.copytree(sd1_folder, tmp_path / "m")
    shutil.rmtree(folder / "vae")
    with pytest.raises(ModelNotFoundError, match="no vae/ folder"):
        StableDiffusion.from_pretrained(folder)


def test_repo_id_loads_from_hub_cache_offline(sd1_folder, tmp_path, monkeypatch):
    """A repo id resolves through huggingface_hub's cache layout with HF_HUB_OFFLINE=1 (no network here)."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny--sd1"
    shutil.copytree(sd1_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    sd = StableDiffusion.from_pretrained("tiny/sd1")
    ref = StableDiffusion.from_pretrained(sd1_folder)
    assert torch.equal(sd.unet.conv_out.weight, ref.unet.conv_out.weight)
    with pytest.raises(ModelNotFoundError, match="neither a local folder nor in the hub cache"):
        StableDiffusion.from_pretrained("tiny/absent")


@pytest.mark.parametrize("path, content, named", [
    ("scheduler/scheduler_config.json", "{not json", "scheduler_config.json"),
    ("scheduler/scheduler_config.json", '{"thresholding": true}', "thresholding"),
    ("tokenizer/tokenizer_config.json", '{"model_max_length": "77"}', "model_max_length"),
    ("diffedit.json", "[1, 2", "diffedit.json"),
])
def test_broken_scheduler_tokenizer_or_defaults_file_is_a_config_error_naming_it(sd1_folder, tmp_path, path,
                                                                                  content, named):
    folder = shutil.copytree(sd1_folder, tmp_path / "m")
    (folder / path).write_text(content)
    with pytest.raises(ConfigError, match=named) as e:
        StableDiffusion.from_pretrained(folder)
    assert str(folder) in str(e.value)



def test_compile_unet_compiles_in_place_keeping_names_keys_and_numbers(sd1_folder):
    """One real compile (about 6 s for this tiny UNet on one shape): the same module, the same state-dict keys, and
    the eager output within float rounding."""
    sd = StableDiffusion.from_pretrained(sd1_folder)  # its own copy: compiling changes the module in place
    unet, keys = sd.unet, list(sd.unet.state_dict())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, sd.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = sd.unet(x, 401, text)
        sd.compile_unet()
        compiled = sd.unet(x, 401, text)
    assert sd.unet is unet and list(sd.unet.state_dict()) == keys
    assert sd.unet._compiled_call_impl is not None  # nn.Module.compile's mark: the module's call is compiled
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("content", [b"\xff\xfe not text", b"[1, 2]"], ids=["not-utf8", "not-an-object"])
def test_a_config_that_is_not_a_json_object_is_one_config_error_naming_the_file(sd1_folder, tmp_path, content):
    """Bytes that are not UTF-8 text, or JSON that is not an object, are refused like broken JSON (they used to
    escape as a UnicodeDecodeError or a TypeError deep in the config parser)."""
    folder = shutil.copytree(sd1_folder, tmp_path / "m")
    (folder / "unet" / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=r"unet/config.json (is not valid JSON|must hold a JSON object)"):
        StableDiffusion.from_pretrained(folder)


@pytest.mark.parametrize("component, key, dtype", [("unet", "conv_in.weight", torch.int32),
                                                   ("vae", "decoder.conv_out.bias", torch.int64),
                                                   ("text_encoder", "final_layer_norm.weight", torch.bool)])
def test_integer_or_bool_weights_are_one_weights_error_naming_the_key_and_dtype(sd1_folder, tmp_path, component,
                                                                                key, dtype):
    """They used to escape from load_state_dict as torch's "Only Tensors of floating point ... can require
    gradients"."""
    folder = shutil.copytree(sd1_folder, tmp_path / "m")
    f = next((folder / component).glob("*.safetensors"))
    state = load_file(f)
    name = next(k for k in state if k.endswith(key))  # the text encoder's keys carry the hub's text_model. prefix
    state[name] = state[name].to(dtype)
    save_file(state, f)
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_pretrained(folder)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{component}/: ")
    assert f"stored as integers or bools: {key} ({str(dtype).removeprefix('torch.')})" in message


BAD_CONFIGS = {
    # name: (component, field, value, words of the message)
    "text width as text": ("text_encoder", "hidden_size", "32", "hidden_size='32' must be an int >= 1"),
    "text heads not dividing": ("text_encoder", "num_attention_heads", 5,
                                "num_attention_heads=5 must divide hidden_size=32"),
    "text eps zero": ("text_encoder", "layer_norm_eps", 0, "layer_norm_eps=0 must be a positive number"),
    "vae layers per level": ("vae", "layers_per_block", [1, 1, 1, 1], "layers_per_block=[1, 1, 1, 1] must be a "
                                                                      "single integer"),
    "vae scaling text": ("vae", "scaling_factor", "abc", "scaling_factor='abc' must be a positive number"),
    "vae groups": ("vae", "norm_num_groups", 3, "norm_num_groups=3 must divide every channel count"),
    "vae non-square size": ("vae", "sample_size", [64, 32], "sample_size=[64, 32] must be an int >= 1 (or a pair of "
                                                           "equal ones"),
    "unet groups": ("unet", "norm_num_groups", 7, "norm_num_groups=7 must divide every channel count of "
                                                  "block_out_channels=[32, 64]"),
    "unet heads 3": ("unet", "attention_head_dim", 3, "attention_head_dim=3 gives 3 attention heads at level 0, "
                                                     "which do not divide its 32 channels"),
    "unet heads 64": ("unet", "attention_head_dim", 64, "attention_head_dim=64 gives 64 attention heads at level 0"),
    "unet bool width": ("unet", "cross_attention_dim", True, "cross_attention_dim=True must be"),
    "unet flag as text": ("unet", "use_linear_projection", "false", "use_linear_projection='false' must be None "
                                                                    "or True or False"),
    "unet block list": ("unet", "block_out_channels", [32, "64"], "block_out_channels=[32, '64'] must be a "
                                                                 "non-empty list of ints"),
    "unet nested layers": ("unet", "transformer_layers_per_block", [[1, 1], 1], "transformer_layers_per_block="),
    "unet sample pair": ("unet", "sample_size", [8, 16], "sample_size=[8, 16] must be an int >= 1 (or a pair"),
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_a_config_value_of_the_wrong_type_or_size_is_one_config_error_naming_the_file_and_field(sd1_folder, tmp_path,
                                                                                                name):
    """Each of these used to load and fail at the first forward pass, or escape as a raw TypeError / ValueError."""
    component, key, value, words = BAD_CONFIGS[name]
    folder = shutil.copytree(sd1_folder, tmp_path / "m")
    cfg = folder / component / "config.json"
    raw = json.loads(cfg.read_text())
    raw[key] = value
    cfg.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as e:
        StableDiffusion.from_pretrained(folder)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{cfg}: {component} config: ")
    assert words in message


def test_a_square_sample_size_pair_reads_as_its_side(sd1_folder, tmp_path):
    """diffusers accepts [h, w]; every SD pipeline uses it as one number, so only a square pair is read (as that
    number); a non-square one is refused (above)."""
    folder = shutil.copytree(sd1_folder, tmp_path / "m")
    for component, side in (("unet", 8), ("vae", 64)):
        cfg = folder / component / "config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "sample_size": [side, side]}))
    sd = StableDiffusion.from_pretrained(folder)
    assert sd.unet.config.sample_size == 8 and sd.vae.config.sample_size == 64


def test_model_index_of_diffusers_stable_diffusion_and_diffedit_pipelines_passes(sd1_folder, tmp_path):
    """The folders diffusers writes: StableDiffusionPipeline's (the fixture) and the DiffEdit pipeline's, which adds
    its inverse_scheduler; also the official repos' PNDM scheduler and a checker with its image processor."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline

    from diffedit.models.config import check_model_index

    index = json.loads((sd1_folder / "model_index.json").read_text())
    check_model_index(index, sd1_folder / "model_index.json")
    check_model_index({**index, "scheduler": ["diffusers", "PNDMScheduler"],
                       "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
                       "feature_extractor": ["transformers", "CLIPImageProcessor"]}, "official")
    parts = StableDiffusionDiffEditPipeline.from_pretrained(sd1_folder, safety_checker=None,
                                                            requires_safety_checker=False).components
    scheduler = DDIMScheduler.from_config(parts["scheduler"].config)
    pipe = StableDiffusionDiffEditPipeline(**{**parts, "scheduler": scheduler,
                                              "inverse_scheduler": DDIMInverseScheduler.from_config(scheduler.config)})
    pipe.register_to_config(_name_or_path=str(sd1_folder))
    pipe.save_config(tmp_path)  # model_index.json only
    saved = json.loads((tmp_path / "model_index.json").read_text())
    assert saved["inverse_scheduler"] == ["diffusers", "DDIMInverseScheduler"]
    check_model_index(saved, tmp_path / "model_index.json")


BAD_INDEXES = {
    # name: (entries changed, words of the message)
    "other unet class": ({"unet": ["diffusers", "UNet2DModel"]},
                         "unsupported unet ['diffusers', 'UNet2DModel']; diffedit builds ['diffusers', "
                         "'UNet2DConditionModel']"),
    "no unet": ({"unet": None}, "no unet entry"),
    "unet of no component": ({"unet": [None, None]}, "no unet entry"),
    "other vae": ({"vae": ["diffusers", "AutoencoderTiny"]}, "unsupported vae ['diffusers', 'AutoencoderTiny']"),
    "other text encoder": ({"text_encoder": ["transformers", "T5EncoderModel"]}, "unsupported text_encoder"),
    "other tokenizer": ({"tokenizer": ["transformers", "T5TokenizerFast"]}, "unsupported tokenizer"),
    "text encoder from another library": ({"text_encoder": ["diffusers", "CLIPTextModel"]},
                                          "unsupported text_encoder"),
    "flow-matching scheduler": ({"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]},
                                "unsupported scheduler ['diffusers', 'FlowMatchEulerDiscreteScheduler']; DiffEdit "
                                "samples with DDIM"),
    "LCM scheduler": ({"scheduler": ["diffusers", "LCMScheduler"]}, "unsupported scheduler"),
    "other inverse scheduler": ({"inverse_scheduler": ["diffusers", "DDIMScheduler"]},
                                "unsupported inverse_scheduler"),
    "image encoder": ({"image_encoder": ["transformers", "CLIPVisionModelWithProjection"]},
                      "unsupported image_encoder"),
    "SDXL's second text encoder": ({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                                    "tokenizer_2": ["transformers", "CLIPTokenizer"]},
                                   "unknown component(s) text_encoder_2, tokenizer_2"),
    "not a pair": ({"vae": "AutoencoderKL"}, "unsupported vae 'AutoencoderKL'"),
}


@pytest.mark.parametrize("name", BAD_INDEXES)
def test_model_index_naming_a_class_we_do_not_build_or_an_extra_component_is_one_config_error(sd1_folder, name):
    """`check_model_index`, which from_pretrained calls."""
    from diffedit.models.config import check_model_index

    changes, words = BAD_INDEXES[name]
    index = {**json.loads((sd1_folder / "model_index.json").read_text()), **changes}
    path = sd1_folder / "model_index.json"
    with pytest.raises(ConfigError) as e:
        check_model_index(index, path)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: ") and words in str(e.value)


def test_from_pretrained_refuses_a_folder_whose_model_index_names_another_unet(sd1_folder, tmp_path):
    """The check is wired into loading: a UNet2DModel folder was loaded as a UNet2DConditionModel."""
    folder = tmp_path / "other"
    shutil.copytree(sd1_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "unet": ["diffusers", "UNet2DModel"]}))
    with pytest.raises(ConfigError, match="unsupported unet"):
        StableDiffusion.from_pretrained(folder)


def test_accepted_schedulers_are_diffusers_sd_schedulers_but_edm():
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

    from diffedit.models.config import SD_SCHEDULERS

    assert set(SD_SCHEDULERS) == {s.name for s in KarrasDiffusionSchedulers} - {"EDMEulerScheduler"}


@pytest.mark.parametrize("kwargs, error, message", [
    ({"dtype": "auto"}, ValueError, "dtype 'auto': expected torch.float32, torch.float16 or torch.bfloat16"),
    ({"dtype": "fp16"}, ValueError, "dtype 'fp16'"),
    ({"dtype": torch.int8}, ValueError, "dtype torch.int8"),
    ({"dtype": np.float16}, ValueError, "dtype <class 'numpy.float16'>: expected torch.float32"),
    ({"device": "gpu"}, ValueError, "device 'gpu': not a device name"),
    ({"device": "CPU"}, ValueError, "device 'CPU': not a device name"),
    ({"device": "meta"}, ValueError, "device meta: a model loads onto cpu, cuda, cuda:N or mps"),
    ({"device": 0}, TypeError, "device: expected a name such as 'cpu' or 'cuda', or a torch.device; got int"),
    pytest.param({"device": "cuda"}, ValueError, "device cuda: no such CUDA device here \\(use cpu\\)",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_a_device_or_dtype_it_cannot_load_in_is_one_error_naming_it_before_any_file_is_read(sd1_folder, kwargs, error,
                                                                                            message, monkeypatch):
    import importlib

    importlib.import_module("diffedit.checkpoint_file")  # before the patch, so its own binding stays the real one
    from diffedit import stable_diffusion

    monkeypatch.setattr(stable_diffusion, "resolve_model_folder", lambda *a: pytest.fail("a file was read"))
    with pytest.raises(error, match=message):
        StableDiffusion.from_pretrained(sd1_folder, **kwargs)
    with pytest.raises(error, match=message):
        StableDiffusion.from_single_file(sd1_folder / "absent.safetensors", **kwargs)


@pytest.mark.parametrize("dtype, loaded", [(None, torch.float32), ("float16", torch.float16),
                                           ("torch.bfloat16", torch.bfloat16)])
def test_dtype_none_is_float32_and_a_dtypes_name_is_taken_as_load_model_takes_it(dtype, loaded):
    """dtype=None used to keep the stored dtype: the shipped model's fp16 weights then ran in float16 on the CPU."""
    import diffedit

    sd = StableDiffusion.from_pretrained(diffedit.SHIPPED_MODEL, device=None, dtype=dtype)
    assert sd.dtype == loaded and sd.device == torch.device("cpu")
    assert {p.dtype for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters()} == {loaded}


def test_same_device_reads_a_bare_cuda_as_the_current_device(monkeypatch):
    """One rule for "is the model already there" (api.load_model and the facade's `to`): "cuda" is the current CUDA
    device, so it is "cuda:1" only while device 1 is current; the CPU is one device however it is named."""
    from diffedit.stable_diffusion import same_device

    d = torch.device
    assert same_device(d("cpu"), d("cpu")) and same_device(d("cpu"), d("cpu", 0))
    assert not same_device(d("cpu"), d("cuda", 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert same_device(d("cuda"), d("cuda", 1)) and not same_device(d("cuda"), d("cuda", 0))
    assert same_device(d("cuda", 1), d("cuda")) and not same_device(d("cuda", 0), d("cuda", 1))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert same_device(d("cuda"), d("cuda", 0)) and not same_device(d("cuda"), d("cuda", 1))


@pytest.mark.parametrize("change, message", [
    ({"in_channels": 9}, r"UNet's in_channels is 9 but the VAE's latent_channels is 4 \(an inpainting UNet"),
    ({"out_channels": 8}, "UNet's out_channels is 8 but the VAE's latent_channels is 4"),
    ({"cross_attention_dim": 48}, "UNet's cross_attention_dim is 48 but the text encoder's hidden_size is 32")],
    ids=["inpainting", "out-channels", "cross-attention"])
def test_parts_that_do_not_fit_together_are_refused_before_any_weight_is_read(sd1_folder, tmp_path, monkeypatch,
                                                                              change, message):
    """A UNet whose weights match its own config but not the VAE or the text encoder (an inpainting UNet, 9 inputs)
    loaded, then failed in the first edit with torch's raw channel / matmul error; from_pretrained and
    from_single_file (with that folder as config) now refuse it by its config fields."""
    from diffusers import UNet2DConditionModel

    import diffedit.stable_diffusion
    import diffedit.checkpoint_file
    from diffedit import save_single_file

    single = save_single_file(StableDiffusion.from_pretrained(sd1_folder), tmp_path / "model.safetensors")
    folder = tmp_path / "other"
    shutil.copytree(sd1_folder, folder)
    config = {k: v for k, v in json.loads((folder / "unet" / "config.json").read_text()).items()
              if not k.startswith("_")}
    UNet2DConditionModel(**{**config, **change}).save_pretrained(folder / "unet", safe_serialization=True)

    def no_weights(*args):
        raise AssertionError("weights were read")

    monkeypatch.setattr(diffedit.stable_diffusion, "component_weights", no_weights)
    monkeypatch.setattr(diffedit.stable_diffusion, "load_safety_components", no_weights)  # its weights too
    with pytest.raises(ConfigError, match=message):
        StableDiffusion.from_pretrained(folder)
    monkeypatch.setattr(diffedit.checkpoint_file, "split_state", no_weights)
    with pytest.raises(ConfigError, match=message):
        StableDiffusion.from_single_file(single, config=folder)


def test_to_casts_networks_with_their_learned_words_and_lora_as_loading_in_that_dtype(sd1_folder, tmp_path):
    """`StableDiffusion.to(dtype=...)` after a learned word and a LoRA were added gives the same text states and
    UNet output, bit for bit, as a model loaded in that dtype with the same word and LoRA; bad arguments move
    nothing."""
    from test_lora import random_pairs, write_lora

    from diffedit import method

    word = {"<w>": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))}
    lora = None
    models = []
    for dtype, cast in ((torch.float32, torch.bfloat16), (torch.bfloat16, None)):
        sd = StableDiffusion.from_pretrained(sd1_folder, dtype=dtype)
        if lora is None:
            lora = write_lora(tmp_path / "l.safetensors", random_pairs(sd.unet, 3), random_pairs(sd.text_encoder, 4))
        sd.load_textual_inversion(word)
        sd.load_lora_weights(str(lora))
        models.append(sd.to(dtype=cast) if cast else sd)
    with pytest.raises(ValueError, match="dtype torch.int8"):
        models[0].to("cpu", torch.int8)
    with pytest.raises(ValueError, match="device 'tpu'"):
        models[0].to("tpu", torch.float32)
    assert models[0].dtype == torch.bfloat16  # nothing moved
    texts = [method.encode_text(sd, ["a <w> on grass"]).cond for sd in models]
    assert texts[0].dtype == torch.bfloat16 and torch.equal(texts[0], texts[1])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        outs = [sd.unet(x, torch.tensor(500), texts[0]) for sd in models]
    assert torch.equal(outs[0], outs[1])
