"""The safety checker (models/safety_checker.py, models/clip_vision.py, models/image_processor.py, diffedit/safety.py)
against diffusers' `StableDiffusionSafetyChecker` and transformers' `CLIPVisionModel` / `CLIPImageProcessor` on
tiny random weights: the vision tower, the image processor, the flags (at the 3-decimal rounding boundary and with
the special-care adjustment), the blacked-out images, the whole DiffEdit call against diffusers' pipeline, loading
(hub and transformers-5 key layouts, requires_safety_checker) and every broken folder."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from diffedit import StableDiffusionDiffEdit, StableDiffusion
from diffedit.models.config import CLIPVisionConfig, SafetyCheckerConfig
from diffedit.models.image_processor import CLIPImageProcessor, ImageProcessorConfig
from diffedit.models.safety_checker import FLAGGED_WARNING, StableDiffusionSafetyChecker, flag_scores
from diffedit.models.weights import WeightsError, component_weights, load_state
from diffedit.safety import run_safety_checker
from diffedit.stable_diffusion import _allow_patterns
from diffedit.validation import ConfigError
from tiny_checkpoints import _randomize, build_components
from parity import gen, picture, reference_pipeline

torch.set_num_threads(1)

VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
PROJECTION = 16
POOLED_TOL = 1e-5  # max abs difference of the vision tower's pooled output (float32)
IMAGE_TOL = 5e-3  # max abs difference of decoded images in [0, 1] (as tests/test_facade.py)
STEPS = 6
NEVER = 2.0  # a threshold no cosine reaches


def reference_checker(seed: int = 7, hidden_act: str = "quick_gelu"):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker as Reference
    from transformers import CLIPConfig

    config = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=100, bos_token_id=0, eos_token_id=2,
                                         pad_token_id=1),
                        vision_config={**VISION, "hidden_act": hidden_act}, projection_dim=PROJECTION)
    checker = Reference(config).eval()
    _randomize(checker, seed, 0.2)
    set_thresholds(checker, [NEVER] * 3, [NEVER] * 17)
    return checker


def set_thresholds(checker, special: list[float], concepts: list[float], special_embeds=None, concept_embeds=None):
    with torch.no_grad():
        checker.special_care_embeds_weights.copy_(torch.tensor(special))
        checker.concept_embeds_weights.copy_(torch.tensor(concepts))
        if special_embeds is not None:
            checker.special_care_embeds.copy_(special_embeds)
        if concept_embeds is not None:
            checker.concept_embeds.copy_(concept_embeds)


def reference_processor(**kwargs):
    from transformers import CLIPImageProcessor as Reference

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "requires torchvision; falling back to CLIPImageProcessorPil"
        return Reference(**kwargs)


def ours_from(folder) -> StableDiffusionSafetyChecker:
    with torch.device("meta"):
        checker = StableDiffusionSafetyChecker(SafetyCheckerConfig.from_file(folder / "config.json"))
    return load_state(checker, component_weights(folder, "transformers"), "safety_checker/").eval()


# ----------------------------------------------------------------------------------------------------------------
# The vision tower and the image processor


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_vision_tower_pooled_output_matches_transformers_clip_vision_model(tmp_path, hidden_act):
    ref = reference_checker(hidden_act=hidden_act)
    ref.save_pretrained(tmp_path)
    ours = ours_from(tmp_path)
    x = torch.randn(3, 3, 32, 32, generator=gen(1))
    with torch.no_grad():
        expected = ref.vision_model(x).pooler_output
        got = ours.vision_model(x)
    assert got.shape == (3, 32)
    assert (got - expected).abs().max() < POOLED_TOL
    assert (ours.image_embeds(x) - ref.visual_projection(expected)).abs().max() < POOLED_TOL
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, 3, 32, 32\)"):
        ours.vision_model(torch.zeros(1, 3, 64, 64))


# The SD 1.5 safety checker's config.json as the hub has it (written by transformers 4.22: generic keys in each
# sub-config, the real values repeated in *_config_dict), trimmed of generic keys that change nothing.
SD15_CONFIG = {
    "_commit_hash": "4bb648a606ef040e7685bde262611766a5fdd67b",
    "_name_or_path": "CompVis/stable-diffusion-safety-checker",
    "architectures": ["StableDiffusionSafetyChecker"], "initializer_factor": 1.0, "logit_scale_init_value": 2.6592,
    "model_type": "clip", "projection_dim": 768, "torch_dtype": "float32", "transformers_version": None,
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                    "model_type": "clip_text_model", "vocab_size": 49408},
    "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                         "num_hidden_layers": 12},
    "vision_config": {"add_cross_attention": False, "architectures": None, "attention_dropout": 0.0,
                      "bos_token_id": None,
                      "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 1024, "id2label": {"0": "LABEL_0"},
                      "image_size": 224, "initializer_factor": 1.0, "initializer_range": 0.02,
                      "intermediate_size": 4096, "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
                      "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 24, "patch_size": 14,
                      "torch_dtype": None, "use_bfloat16": False, "pruned_heads": {}, "return_dict": True},
    "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                           "num_hidden_layers": 24, "patch_size": 14},
}


def test_sd15_config_parses_and_full_size_keys_and_shapes_equal_diffusers():
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker as Reference
    from transformers import CLIPConfig

    config = SafetyCheckerConfig.from_dict(SD15_CONFIG)
    assert config.projection_dim == 768 and config.vision == CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14)
    with torch.device("meta"):
        ours = StableDiffusionSafetyChecker(config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = Reference(CLIPConfig(**json.loads(json.dumps(SD15_CONFIG))))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("kwargs", [
    dict(),  # transformers' defaults: shortest edge 224 bicubic, crop 224
    dict(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}),
    dict(size={"shortest_edge": 33}, crop_size={"height": 30, "width": 31}, resample=2),
    dict(size={"height": 36, "width": 20}, crop_size={"height": 32, "width": 32}, resample=1),  # crop pads
    dict(size={"shortest_edge": 40}, do_center_crop=False, image_mean=[0.5] * 3, image_std=[0.25, 0.5, 1.0]),
    dict(size={"shortest_edge": 32}, do_resize=False, crop_size={"height": 32, "width": 32}, do_normalize=False,
         rescale_factor=0.5),
])
def test_image_processor_matches_transformers_clip_image_processor_exactly(tmp_path, kwargs):
    """Same steps in the same number types, so the same float32 values (tolerance 0); pictures wide, tall, square,
    and smaller than the crop."""
    ref = reference_processor(**kwargs)
    ref.save_pretrained(tmp_path)
    ours = CLIPImageProcessor.from_folder(tmp_path)
    sizes = [(64, 64), (80, 48), (45, 90), (24, 30)] if "do_resize" not in kwargs else [(64, 64)]
    for i, size in enumerate(sizes):
        pics = [picture(i, size), picture(i + 10, size)]
        expected = ref(pics, return_tensors="pt").pixel_values
        got = ours(pics)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert torch.equal(got, expected), (size, (got - expected).abs().max())


def test_image_processor_reads_the_old_int_size_form_of_sd15():
    """SD 1.5's preprocessor_config.json (feature_extractor_type CLIPFeatureExtractor, int size and crop_size)."""
    raw = {"crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_resize": True,
           "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
           "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}
    config = ImageProcessorConfig.from_dict(raw)
    assert config == ImageProcessorConfig()
    expected = reference_processor(**{k: v for k, v in raw.items() if k != "feature_extractor_type"})
    pic = picture(3, (300, 200))
    assert torch.equal(CLIPImageProcessor(config)([pic]), expected([pic], return_tensors="pt").pixel_values)


# ----------------------------------------------------------------------------------------------------------------
# The decision rule


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """A reference checker whose embeddings and thresholds are crafted on four inputs so that:
    0: concept 0 scores +0.0004 before rounding, 0.000 after: NOT flagged (diffusers' unrounded ONNX rule flags it);
    1: concept 1 scores +0.0006, rounded 0.001: flagged;
    2: concept 2 scores -0.005, but special-care concept 0 scores +0.002, which adds 0.01: flagged;
    3: concept 3 scores exactly 0.0 (threshold = its own cosine): NOT flagged (the rule is score > 0).
    Concept i (and special concept 0 for input 2) points from the other inputs' mean embedding to input i's, and
    the cosines are far enough apart that no input comes within 0.02 of another's threshold."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    ref = reference_checker()
    x = torch.randn(4, 3, 32, 32, generator=gen(2))
    with torch.no_grad():
        embeds = torch.nn.functional.normalize(ref.visual_projection(ref.vision_model(x).pooler_output))
    others = (embeds.sum(0, keepdim=True) - embeds) / 3
    directions = torch.nn.functional.normalize(embeds - others)  # (4, P)
    cos = (embeds @ directions.t()).numpy()  # (4 inputs, 4 concepts)
    for k in range(4):
        assert np.delete(cos[:, k], k).max() < cos[k, k] - 0.02, "the crafted inputs are too alike"
    concepts = torch.cat([directions, torch.randn(13, PROJECTION, generator=gen(3))])
    specials = torch.cat([directions[2:3], torch.randn(2, PROJECTION, generator=gen(4))])
    d = [float(c) for c in cos.diagonal()]
    set_thresholds(ref, [d[2] - 0.002, NEVER, NEVER],
                   [d[0] - 0.0004, d[1] - 0.0006, d[2] + 0.005, NEVER] + [NEVER] * 13, specials, concepts)
    with torch.no_grad():  # the tie: threshold = the cosine diffusers computes for input 3 and concept 3
        ref.concept_embeds_weights[3] = cosine_distance(ref.visual_projection(ref.vision_model(x).pooler_output),
                                                        ref.concept_embeds)[3, 3]
    folder = tmp_path_factory.mktemp("crafted")
    ref.save_pretrained(folder)
    return ref, ours_from(folder), x


def test_flags_match_diffusers_at_the_rounding_boundary_the_tie_and_with_special_care(crafted):
    ref, ours, x = crafted
    images = torch.rand(4, 3, 8, 8, generator=gen(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, expected = ref(clip_input=x, images=images.clone())
        _, unrounded = ref.forward_onnx(x, images.clone())
    assert expected == [False, True, True, False]
    assert unrounded.tolist() == [True, True, True, False]  # the rounding is what spares input 0
    assert ours.has_nsfw_concepts(x) == expected


def test_blacked_out_images_and_warning_match_diffusers(crafted):
    ref, ours, x = crafted
    images = torch.rand(4, 3, 8, 8, generator=gen(6)) * 2 - 1
    expected, expected_flags = ref(clip_input=x, images=images.clone())
    with pytest.warns(UserWarning, match="Potential NSFW content was detected"):
        got, flags = ours(x, images)
    assert flags == expected_flags and torch.equal(got, expected)
    assert torch.equal(got[[0, 3]], images[[0, 3]]) and not got[[1, 2]].any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept, none = ours(x[[0, 3]], images[[0, 3]])  # nothing flagged: no warning
    assert none == [False, False] and torch.equal(kept, images[[0, 3]])


def test_special_care_adjustment_is_per_picture_and_rounding_decides_at_half_a_thousandth():
    """Direct checks of the rule on hand-made cosines (float32): a positive special score adds 0.01 to that
    picture's concept scores only; rounding to 3 decimals decides at 0.0005."""
    special = np.array([[0.502, 0.495, 0.1], [0.1, 0.1, 0.1]], dtype=np.float32)
    concept = np.array([[0.4951] + [0.0] * 16, [0.4951] + [0.0] * 16], dtype=np.float32)
    thresholds = [0.5] * 3
    assert flag_scores(special, thresholds, concept, [0.5] * 17) == [True, False]  # 0.4951-0.5+0.01 > 0; no care
    concept[:, 0] = np.float32(0.5004)
    assert flag_scores(special * 0, thresholds, concept, [0.5] * 17) == [False, False]  # rounds to 0.000
    concept[:, 0] = np.float32(0.5006)
    assert flag_scores(special * 0, thresholds, concept, [0.5] * 17) == [True, True]  # rounds to 0.001


# ----------------------------------------------------------------------------------------------------------------
# The whole pipeline on a tiny model with a checker


def save_model_with_checker(folder, checker, processor, requires: bool = True):
    from diffusers import StableDiffusionPipeline

    parts = build_components("sd1", 0)
    pipe = StableDiffusionPipeline(**parts, safety_checker=checker, feature_extractor=processor,
                                   requires_safety_checker=requires)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def edit(pipe, output_type="np", return_dict=True):
    images, sources, targets = [picture(6), picture(7)], ["a cat", "a bowl of fruit"], ["a dog", "a bowl of pears"]
    g = gen(8)
    mask = pipe.generate_mask(image=images, source_prompt=sources, target_prompt=targets,
                              mask_thresholding_ratio=2.0, num_maps_per_mask=2, num_inference_steps=STEPS, generator=g)
    inv = pipe.invert(prompt=sources, image=images, num_inference_steps=STEPS, generator=g)
    return pipe(prompt=targets, mask_image=mask, image_latents=inv.latents, num_inference_steps=STEPS, generator=g,
                output_type=output_type, return_dict=return_dict)


@pytest.fixture(scope="module")
def checked_folder(tmp_path_factory):
    """A tiny SD1 model with a checker crafted on the edit's own two outputs: concept 0 points from the second
    image's embedding to the first's, threshold 0: the first image is flagged, the second not (cosines +-0.16)."""
    processor = reference_processor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    checker = reference_checker()
    folder = save_model_with_checker(tmp_path_factory.mktemp("checked"), checker, processor)
    ref = reference_pipeline(folder, safety_checker=True)
    outputs = edit(ref, output_type="pt").images  # nothing flagged yet: (2, 3, 64, 64) in [0, 1]
    pictures = ref.image_processor.numpy_to_pil(ref.image_processor.pt_to_numpy(outputs))  # as run_safety_checker
    clip_input = processor(pictures, return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = torch.nn.functional.normalize(checker.visual_projection(checker.vision_model(clip_input)[1]))
    direction = torch.nn.functional.normalize(embeds[:1] - embeds[1:])  # cosines +-sqrt((1 - cos(e0, e1)) / 2)
    assert float(embeds[0] @ embeds[1]) < 0.999, "the two edits are too alike to craft a checker on"
    set_thresholds(checker, [NEVER] * 3, [0.0] + [NEVER] * 16, concept_embeds=torch.cat(
        [direction, torch.randn(16, PROJECTION, generator=gen(9))]))
    shutil.rmtree(folder / "safety_checker")
    checker.save_pretrained(folder / "safety_checker")
    return folder


def test_facade_call_matches_diffusers_pipeline_with_the_checker_on(checked_folder):
    ref = reference_pipeline(checked_folder, safety_checker=True)
    ours = StableDiffusionDiffEdit.from_pretrained(checked_folder)
    assert isinstance(ours.model.safety_checker, StableDiffusionSafetyChecker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = edit(ref)
    with pytest.warns(UserWarning, match="Potential NSFW content was detected"):
        got = edit(ours)
    assert expected.nsfw_content_detected == got.nsfw_content_detected == [True, False]
    assert got.images.shape == expected.images.shape == (2, 64, 64, 3)
    assert not got.images[0].any() and not expected.images[0].any()  # black
    assert np.abs(got.images - expected.images).max() < IMAGE_TOL and got.images[1].std() > 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pil, flags = edit(ours, output_type="pil", return_dict=False)
        pt = edit(ours, output_type="pt").images
        latents = edit(ours, output_type="latent")
    assert flags == [True, False] and np.asarray(pil[0]).max() == 0 and pil[0].size == (64, 64)
    assert np.abs(np.asarray(pil[1]).astype(int) - np.round(expected.images[1] * 255)).max() <= 2
    assert pt.shape == (2, 3, 64, 64) and not pt[0].any() and pt[1].min() >= 0
    assert latents.nsfw_content_detected is None  # diffusers runs no checker on latents
    assert ours.feature_extractor is ours.model.feature_extractor is not None
    ours.safety_checker = ref.safety_checker = None  # turned off, diffusers' way
    expected, got = edit(ref), edit(ours)
    assert expected.nsfw_content_detected is got.nsfw_content_detected is None and got.images[0].std() > 0.01
    assert np.abs(got.images - expected.images).max() < IMAGE_TOL


def test_run_safety_checker_without_a_checker_returns_the_pixels_and_no_flags(sd1_folder):
    sd = StableDiffusion.from_pretrained(sd1_folder)
    assert sd.safety_checker is None and sd.feature_extractor is None
    pixels = torch.rand(2, 3, 64, 64)
    same, flags = run_safety_checker(sd, pixels)
    assert same is pixels and flags is None


@pytest.fixture(scope="module")
def flag_all_folder(checked_folder, tmp_path_factory):
    """The checked model with every concept threshold at -1 (every picture flagged), its checker weights rewritten in
    the hub's key layout (`vision_model.vision_model.*`, transformers < 5)."""
    from safetensors.torch import save_file

    folder = shutil.copytree(checked_folder, tmp_path_factory.mktemp("flag_all") / "model")
    checker = ours_from(folder / "safety_checker")
    state = {f"vision_model.{k}" if k.startswith("vision_model.") else k: v for k, v in checker.state_dict().items()}
    state["concept_embeds_weights"] = torch.full((17,), -1.0)
    save_file(state, str(folder / "safety_checker" / "model.safetensors"))
    return folder


def test_invert_decoded_latents_are_not_checked_as_in_diffusers(flag_all_folder):
    ref = reference_pipeline(flag_all_folder, safety_checker=True)
    ours = StableDiffusionDiffEdit.from_pretrained(flag_all_folder)
    assert ours.model.safety_checker is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no NSFW warning from ours
        got = ours.invert(prompt="a cat", image=picture(1), num_inference_steps=STEPS, decode_latents=True,
                          output_type="np", generator=gen(2)).images
    expected = ref.invert(prompt="a cat", image=picture(1), num_inference_steps=STEPS, decode_latents=True,
                          output_type="np", generator=gen(2)).images
    assert got.shape == expected.shape and np.abs(got - expected).max() < IMAGE_TOL
    assert (got.max(axis=(1, 2, 3)) > 0.05).all()  # no black picture


def test_one_call_api_and_cli_black_out_a_flagged_edit_and_say_so(flag_all_folder, tmp_path):
    """diffedit.edit and `diffedit edit` run the checker; a flagged edit is written black (as diffusers returns it)
    with one warning line naming why."""
    import diffedit

    folder = flag_all_folder
    with pytest.warns(UserWarning, match="Potential NSFW content was detected"):
        result = diffedit.edit(picture(1), "a cat", "a dog", model=folder, seed=0, num_inference_steps=STEPS,
                               num_maps_per_mask=2)
    assert result.image.size == (64, 64) and result.image.getextrema() == ((0, 0),) * 3
    picture(1).save(tmp_path / "in.png")
    run = subprocess.run([sys.executable, "-m", "diffedit", "edit", "in.png", "--source", "a cat", "--target", "a dog",
                          "-o", "out.png", "--model", str(folder), "--steps", str(STEPS), "--num-maps", "2", "-q"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if "NSFW" in line]
    assert lines == [f"diffedit: warning: {FLAGGED_WARNING}"]
    assert PIL.Image.open(tmp_path / "out.png").getextrema() == ((0, 0),) * 3


# ----------------------------------------------------------------------------------------------------------------
# Loading


def edit_index(folder, **changes):
    index = json.loads((folder / "model_index.json").read_text())
    index.update(changes)
    (folder / "model_index.json").write_text(json.dumps(index))


def diffusers_warns_no_checker(folder) -> bool:
    """Whether diffusers' StableDiffusionPipeline, loading `folder`, logs its "You have disabled the safety
    checker" warning."""
    import logging

    from diffusers import StableDiffusionPipeline

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    level = logger.level  # other test files quiet diffusers (test_ddim sets ERROR): its warnings must come through
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        StableDiffusionPipeline.from_pretrained(folder)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return any("disabled the safety checker" in line for line in said)


@pytest.mark.parametrize("requires", ["true", "absent", "false"])
def test_the_no_checker_warning_comes_when_diffusers_warns_and_says_whether_model_index_sets_it(checked_folder,
                                                                                              tmp_path, requires):
    """requires_safety_checker set true, absent (diffusers' default, true) or false, with no checker named: ours
    warns exactly when diffusers does, and the line says truthfully whether model_index.json sets it."""
    folder = shutil.copytree(checked_folder, tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=[None, None])
    index.pop("requires_safety_checker", None)
    if requires != "absent":
        index["requires_safety_checker"] = requires == "true"
    (folder / "model_index.json").write_text(json.dumps(index))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        StableDiffusion.from_pretrained(folder)
    said = [str(w.message) for w in caught if "safety checker" in str(w.message)]
    assert bool(said) == diffusers_warns_no_checker(folder) == (requires != "false")
    if requires == "true":
        assert said == [f"{folder} has no safety checker but its model_index.json sets requires_safety_checker to "
                        "true (diffusers warns the same): keep the filter on for anything public, as the Stable "
                        "Diffusion license asks, or set requires_safety_checker to false in model_index.json to say "
                        "it is off on purpose"]
    elif requires == "absent":
        assert len(said) == 1 and "sets requires_safety_checker" not in said[0]
        assert said[0].startswith(f"{folder} has no safety checker but its model_index.json does not set "
                                  "requires_safety_checker, so diffusers' default, true, applies (diffusers warns")


def test_requires_safety_checker_warns_as_diffusers_when_no_checker_is_named(checked_folder, tmp_path):
    folder = shutil.copytree(checked_folder, tmp_path / "model")
    edit_index(folder, safety_checker=[None, None])
    with pytest.warns(UserWarning, match="has no safety checker but its model_index.json sets requires_safety_checker "
                                         "to true"):
        sd = StableDiffusion.from_pretrained(folder)
    assert sd.safety_checker is None and sd.feature_extractor is not None
    edit_index(folder, requires_safety_checker=False)
    shutil.rmtree(folder / "feature_extractor")  # named, absent, and not needed without a checker (SD 2.x repos)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd = StableDiffusion.from_pretrained(folder)
    assert sd.safety_checker is None and sd.feature_extractor is None


def test_hub_download_patterns_take_the_checker_folders_safetensors_only():
    patterns = _allow_patterns(None)
    assert {"safety_checker/model.safetensors", "feature_extractor/preprocessor_config.json",
            "*/config.json"} <= set(patterns)
    assert not any(p.endswith((".bin", ".ckpt", ".pt")) for p in patterns)
    assert "safety_checker/model.fp16.safetensors" in _allow_patterns("fp16")


def _drop_key(folder, key):
    from safetensors.torch import load_file, save_file

    path = folder / "safety_checker" / "model.safetensors"
    state = load_file(str(path))
    del state[key]
    save_file(state, str(path))


def _write_json(folder, name, change):
    path = folder / name
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


BROKEN = {
    "no_folder": (lambda f: shutil.rmtree(f / "safety_checker"), ConfigError, "has no safety_checker/ folder"),
    "no_feature_extractor": (lambda f: edit_index(f, feature_extractor=[None, None]), ConfigError,
                             "no feature_extractor"),
    "no_feature_extractor_folder": (lambda f: shutil.rmtree(f / "feature_extractor"), ConfigError,
                                    "has no feature_extractor/ folder"),
    "other_class": (lambda f: edit_index(f, safety_checker=["mine", "MyChecker"]), ConfigError,
                    "unsupported safety_checker"),
    "requires_not_bool": (lambda f: edit_index(f, requires_safety_checker="yes"), ConfigError,
                          "requires_safety_checker='yes'"),
    "unknown_vision_key": (lambda f: _write_json(f, "safety_checker/config.json",
                                                 lambda r: r["vision_config"].update(use_rope=True)),
                           ConfigError, "unknown field 'use_rope'"),
    "unknown_top_key": (lambda f: _write_json(f, "safety_checker/config.json", lambda r: r.update(extra_head=1)),
                        ConfigError, "unknown field 'extra_head'"),
    "bad_activation": (lambda f: _write_json(f, "safety_checker/config.json",
                                             lambda r: r["vision_config"].update(hidden_act="relu")),
                       ConfigError, "hidden_act='relu'"),
    "config_not_json": (lambda f: (f / "safety_checker" / "config.json").write_text("{"), ConfigError,
                        "not valid JSON"),
    "config_empty_file": (lambda f: (f / "safety_checker" / "config.json").write_text(""), ConfigError,
                          r"safety_checker/config.json is empty \(0 bytes\): it must describe the safety checker "
                          r"\(its vision_config\); fetch the model again"),
    "config_whitespace": (lambda f: (f / "safety_checker" / "config.json").write_text(" \n"), ConfigError,
                          r"safety_checker/config.json holds only whitespace: it must describe"),
    "config_empty_object": (lambda f: (f / "safety_checker" / "config.json").write_text("{}"), ConfigError,
                            r"safety_checker/config.json is an empty JSON object \(\{\}\): it must describe the "
                            r"safety checker \(its vision_config\); fetch the model again"),
    "processor_type": (lambda f: _write_json(f, "feature_extractor/preprocessor_config.json",
                                             lambda r: r.update(image_processor_type="SiglipImageProcessor")),
                       ConfigError, "unsupported processor 'SiglipImageProcessor'"),
    "processor_key": (lambda f: _write_json(f, "feature_extractor/preprocessor_config.json",
                                            lambda r: r.update(do_pad=True)), ConfigError, "unknown field 'do_pad'"),
    "processor_size": (lambda f: _write_json(f, "feature_extractor/preprocessor_config.json",
                                             lambda r: r.update(size={"longest_edge": 40})), ConfigError,
                       "unsupported size"),
    "crop_mismatch": (lambda f: _write_json(f, "feature_extractor/preprocessor_config.json",
                                            lambda r: r.update(crop_size={"height": 48, "width": 48})), ConfigError,
                      "safety checker takes 32x32"),
    "pickle_only": (lambda f: (f / "safety_checker" / "model.safetensors").rename(f / "safety_checker" /
                                                                                  "pytorch_model.bin"),
                    WeightsError, "holds only pickle weights"),
    "truncated": (lambda f: (f / "safety_checker" / "model.safetensors").write_bytes(b"\0" * 10), WeightsError,
                  "truncated or corrupt"),
    "missing_key": (lambda f: _drop_key(f, "concept_embeds"), WeightsError, "missing: concept_embeds"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_checker_folders_are_refused_naming_the_problem(checked_folder, tmp_path, name):
    breaker, error, message = BROKEN[name]
    folder = shutil.copytree(checked_folder, tmp_path / "model")
    breaker(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=message) as info:
            StableDiffusion.from_pretrained(folder)
    assert isinstance(info.value, ValueError)
    if error is ConfigError:
        assert "\n" not in str(info.value)


def test_command_line_refuses_a_broken_checker_with_one_line_and_exit_status_2(checked_folder, tmp_path):
    folder = shutil.copytree(checked_folder, tmp_path / "model")
    BROKEN["unknown_vision_key"][0](folder)
    picture(1).save(tmp_path / "in.png")
    run = subprocess.run([sys.executable, "-m", "diffedit", "edit", "in.png", "--source", "a cat", "--target", "a dog",
                          "-o", "out.png", "--model", str(folder)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert lines[0].startswith("diffedit: error: ") and "unknown field 'use_rope'" in lines[0]
    assert not (tmp_path / "out.png").exists()


def test_diffusers_loading_keywords_torch_dtype_and_safety_checker_none_work_on_the_facade(checked_folder):
    """`from_pretrained(repo, torch_dtype=torch.float16, safety_checker=None)` is the first line diffusers users
    write; it was Python's bare "unexpected keyword argument"."""
    from diffedit import StableDiffusionDiffEdit

    plain = StableDiffusionDiffEdit.from_pretrained(checked_folder)
    assert plain.safety_checker is not None and plain.dtype == torch.float32
    pipe = StableDiffusionDiffEdit.from_pretrained(checked_folder, torch_dtype=torch.bfloat16, safety_checker=None)
    assert pipe.safety_checker is None and pipe.dtype == torch.bfloat16
    assert StableDiffusionDiffEdit.from_pretrained(checked_folder, torch_dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype and torch_dtype are one setting"):
        StableDiffusionDiffEdit.from_pretrained(checked_folder, dtype=torch.float32, torch_dtype=torch.float16)
    with pytest.raises(TypeError, match="safety_checker: only None"):
        StableDiffusionDiffEdit.from_pretrained(checked_folder, safety_checker=plain.safety_checker)


def test_numpy_images_are_blacked_out_as_diffusers_does_and_bad_arguments_are_refused_before_the_checker_runs(
        crafted, monkeypatch):
    """diffusers' forward takes images as a numpy array too (ours failed on `images.device`), and a batch that does
    not match clip_input was found only after the vision tower had run. Tolerance: none (exact arrays)."""
    ref, ours, x = crafted
    images = np.random.default_rng(0).random((4, 8, 8, 3), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected, expected_flags = ref(clip_input=x, images=images.copy())
        got, flags = ours(x, images)
    assert flags == expected_flags and got.dtype == images.dtype and np.array_equal(got, expected)
    monkeypatch.setattr(ours, "has_nsfw_concepts", lambda clip_input: pytest.fail("the checker ran"))
    with pytest.raises(ValueError, match="clip_input has 4 pictures but images has 3"):
        ours(x, torch.zeros(3, 3, 8, 8))
    with pytest.raises(TypeError, match="images must be a tensor or a numpy array of pictures \\(B, ...\\), got list"):
        ours(x, [torch.zeros(3, 8, 8)] * 4)
    with pytest.raises(TypeError, match=r"clip_input must be a tensor \(B, 3, S, S\) of processed pictures, got "
                                        r"Tensor\(3, 32, 32\)"):
        ours(x[0], torch.zeros(4, 3, 8, 8))
