"""Loading a diffusers-layout folder (or a hub repo id) gives components equal to the reference's on the same files."""

import json
import shutil

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
