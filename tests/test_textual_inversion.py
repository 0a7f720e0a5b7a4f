"""Textual inversion against diffusers 0.42.1's `load_textual_inversion` on the tiny random checkpoints: the same
token ids (after diffusers' `maybe_convert_prompt`), the same embedding rows and text-encoder states, the same
masks, inversions and edits from the facade, for diffusers, kohya and A1111 safetensors files, single and
multi-vector, with and without `token=`; and every bad file or argument refused with one line.

Tolerances: ids and embedding rows exactly equal; text states rtol 1e-4, atol 1e-4 x max |ref| (as
test_clip_text); the facade's outputs as test_facade (mask pixels >= 99% equal, latents relative error 1e-3,
images max abs 5e-3).
"""

import copy
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

from diffedit import StableDiffusion, StableDiffusionDiffEdit
from diffedit.api import prompt_warnings
from diffedit.cli import embedding_arg
from diffedit.models.textual_inversion import read_embedding
from diffedit.models.weights import WeightsError
from parity import IMAGE_TOL, LATENT_TOL, MASK_TOL, reference_pipeline

torch.set_num_threads(1)

WIDTH = 32  # the tiny text encoder's hidden size
STEPS = 10


def vectors(n: int | None, seed: int, width: int = WIDTH) -> torch.Tensor:
    """n None: one (D,) vector; else (n, D). Spread like real embeddings relative to the tiny model's rows."""
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn((width,) if n is None else (n, width), generator=g)


def write(path, state: dict) -> str:
    save_file(state, str(path))
    return str(path)


def ref_ids(pipe, prompts) -> torch.Tensor:
    """diffusers' encode_prompt ids: maybe_convert_prompt, then the tokenizer cut and padded to 77."""
    prompts = pipe.maybe_convert_prompt(prompts, pipe.tokenizer)
    return pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids


def assert_text_states_match(sd, pipe, prompts):
    ids = sd.tokenizer(prompts)
    assert torch.equal(ids, ref_ids(pipe, prompts))
    with torch.no_grad():
        ours, ref = sd.text_encoder(ids), pipe.text_encoder(ids)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def assert_rows_match(sd, pipe, names):
    """Each added token has the same id and the same embedding row in both."""
    ours_vocab, ref_vocab = sd.tokenizer.get_vocab(), pipe.tokenizer.get_vocab()
    table = sd.text_encoder.embeddings
    for name in names:
        assert ours_vocab[name] == ref_vocab[name], name
        row = table.added_rows[ours_vocab[name] - table.added_start]
        assert torch.equal(row, pipe.text_encoder.get_input_embeddings().weight[ref_vocab[name]].detach()), name


@pytest.fixture(scope="module")
def loaded(sd1_folder):
    sd, pipe = StableDiffusion.from_pretrained(sd1_folder), reference_pipeline(sd1_folder)
    base_rows = pipe.text_encoder.get_input_embeddings().weight.detach().clone()  # (49408, D)
    return sd, pipe, (pipe.tokenizer._tokenizer.to_str(), base_rows)


@pytest.fixture
def models(loaded):
    """Ours and diffusers' pipeline on the tiny SD1 checkpoint, each test's words unloaded after it."""
    sd, pipe, (base_tokenizer, base_embedding) = loaded
    yield sd, pipe
    if len(sd.tokenizer) > 49408:
        sd.unload_textual_inversion()
    if len(pipe.tokenizer) > 49408 or pipe.text_encoder.get_input_embeddings().num_embeddings > 49408:
        # what diffusers' unload_textual_inversion does, without its slow json dump
        from tokenizers import Tokenizer

        pipe.tokenizer._tokenizer = Tokenizer.from_str(base_tokenizer)
        pipe.text_encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(base_embedding, freeze=False))
        pipe.text_encoder.config.vocab_size = 49408
    assert len(pipe.tokenizer) == 49408 and pipe.text_encoder.get_input_embeddings().num_embeddings == 49408


# ----------------------------------------------------------------------------------------------------------------
# Files of every layout: the same ids, rows and text states as diffusers

LAYOUTS = {
    # name: (state, our token=, diffusers' token=, the token the prompts use, vector count)
    "diffusers single (D,)": ({"<cat-toy>": vectors(None, 1)}, None, None, "<cat-toy>", 1),
    "diffusers single (1, D)": ({"<one>": vectors(1, 2)}, None, None, "<one>", 1),
    "diffusers multi-vector": ({"<multi>": vectors(3, 3)}, None, None, "<multi>", 3),
    "diffusers, token= renames": ({"<cat-toy>": vectors(2, 4)}, "<mine>", "<mine>", "<mine>", 2),
    "kohya emb_params": ({"emb_params": vectors(4, 5)}, "<kohya>", "<kohya>", "<kohya>", 4),
    "A1111 string_to_param.*": ({"string_to_param.*": vectors(2, 6), "string_to_token.*": torch.tensor([265])},
                                "<a1111>", "<a1111>", "<a1111>", 2),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_gives_diffusers_ids_rows_and_text_states(models, tmp_path, layout):
    sd, pipe = models
    state, ours_token, ref_token, word, n = LAYOUTS[layout]
    path = write(tmp_path / "emb.safetensors", state)
    # diffusers reads the one-tensor A1111 form only (its multi-tensor rule wants a nested `string_to_param`)
    ref_state = {"string_to_param": {"*": state["string_to_param.*"]}, "name": "x"} if "A1111" in layout else path
    assert sd.load_textual_inversion(path, token=ours_token) == [word]
    pipe.load_textual_inversion(ref_state, token=ref_token)
    names = [word] + [f"{word}_{i}" for i in range(1, n)]
    assert_rows_match(sd, pipe, names)
    prompts = [f"a photo of {word}", f"{word} next to a {word}, on grass", "no token here"]
    assert_text_states_match(sd, pipe, prompts)
    assert sd.tokenizer(prompts[0])[0, 4:4 + n].tolist() == list(range(49408, 49408 + n))  # every vector, in order


def test_a_folder_and_a_list_of_files_with_tokens_load_as_in_diffusers(models, tmp_path):
    sd, pipe = models
    (tmp_path / "concept").mkdir()
    folder = tmp_path / "concept"
    write(folder / "learned_embeds.safetensors", {"<folder>": vectors(2, 7)})
    a = write(tmp_path / "a.safetensors", {"<a>": vectors(None, 8)})
    b = write(tmp_path / "b.safetensors", {"emb_params": vectors(3, 9)})
    sd.load_textual_inversion(str(folder))
    pipe.load_textual_inversion(str(folder))
    assert sd.load_textual_inversion([a, b], token=[None, "<b>"]) == ["<a>", "<b>"]
    pipe.load_textual_inversion([a, b], token=["<a>", "<b>"])  # diffusers turns [None, x] into [None, x] * 2
    assert_rows_match(sd, pipe, ["<folder>", "<folder>_1", "<a>", "<b>", "<b>_1", "<b>_2"])
    assert_text_states_match(sd, pipe, ["<b> and <a> by <folder>", "<folder>"])


def test_a_state_dict_and_a_tensor_with_several_tokens_load_as_in_diffusers(models):
    sd, pipe = models
    rows = vectors(2, 10)
    sd.load_textual_inversion({"<dict>": vectors(2, 11)})
    pipe.load_textual_inversion({"<dict>": vectors(2, 11)})
    sd.load_textual_inversion(rows, token=["<r0>", "<r1>"])  # one tensor (k, D), k tokens: k single words
    pipe.load_textual_inversion(rows, token=["<r0>", "<r1>"])
    assert_rows_match(sd, pipe, ["<dict>", "<dict>_1", "<r0>", "<r1>"])
    assert_text_states_match(sd, pipe, ["<r1> <dict> <r0>"])


def test_sd2_tokenizer_with_bang_padding_gives_diffusers_ids_and_states(sd2_folder, tmp_path):
    sd, pipe = StableDiffusion.from_pretrained(sd2_folder), reference_pipeline(sd2_folder)
    path = write(tmp_path / "e.safetensors", {"<v2>": vectors(3, 12)})
    sd.load_textual_inversion(path)
    pipe.load_textual_inversion(path)
    assert_text_states_match(sd, pipe, ["a <v2>! on a hill", "<v2>"])


def test_kohya_and_a1111_files_without_token_are_named_by_the_file_not_by_their_key(models, tmp_path):
    """A deliberate difference: diffusers registers the key (`emb_params`) as the word; we use the file name, as
    A1111 does. The ids and rows are diffusers' with token= the file name."""
    sd, pipe = models
    path = write(tmp_path / "EasyThing.safetensors", {"emb_params": vectors(1, 13)})
    assert sd.load_textual_inversion(path) == ["EasyThing"]
    pipe.load_textual_inversion(path)
    assert "emb_params" in pipe.tokenizer.get_vocab()  # what diffusers does without token=
    pipe.unload_textual_inversion()
    pipe.load_textual_inversion(path, token="EasyThing")
    assert_rows_match(sd, pipe, ["EasyThing"])
    assert_text_states_match(sd, pipe, ["a easything, EasyThing"])
    a1111 = write(tmp_path / "mystyle-v2.safetensors", {"string_to_param.*": vectors(2, 14)})
    assert sd.load_textual_inversion(a1111) == ["mystyle-v2"]


def test_a_pipeline_saved_after_loading_words_reads_them_as_diffusers_does(models, tmp_path):
    """diffusers' save_pretrained after load_textual_inversion keeps the words as added tokens and the rows in the
    text encoder; its maybe_convert_prompt then reads `<tok>` as `<tok> <tok>_1 ...`. We read the saved `<tok>` as
    one vector of three (the runs came from add_word only)."""
    sd, pipe = models
    pipe.load_textual_inversion([{"<saved>": vectors(3, 46)}, {"<one>": vectors(None, 47)}])
    pipe.save_pretrained(tmp_path / "saved")
    saved, reloaded = StableDiffusion.from_pretrained(tmp_path / "saved"), reference_pipeline(tmp_path / "saved")
    assert saved.tokenizer("a <saved>")[0, :6].tolist() == [49406, 320, 49408, 49409, 49410, 49407]
    assert_text_states_match(saved, reloaded, ["a <saved>-style cat", "<one>, <saved> and <saved>", "no word"])
    saved.load_textual_inversion({"<new>": vectors(2, 48)})  # a word added on top, then unloaded: the saved stay
    saved.unload_textual_inversion()
    assert_text_states_match(saved, reloaded, ["a <saved>-style cat with <one>"])


def test_multi_vector_word_expands_whatever_its_case_where_diffusers_keeps_one_vector(models, tmp_path):
    """diffusers expands `<tok>` only when the token and the prompt are lower case (maybe_convert_prompt compares
    the tokenizer's lower-cased pieces with the token as loaded, then replaces case-sensitively); otherwise it
    silently reads one vector of n. We expand every occurrence the tokenizer matches: the first id is diffusers',
    the rest follow."""
    sd, pipe = models
    path = write(tmp_path / "e.safetensors", {"<Mixed>": vectors(3, 15)})
    sd.load_textual_inversion(path)
    pipe.load_textual_inversion(path)
    first = pipe.tokenizer.get_vocab()["<Mixed>"]
    for prompt in ["a <Mixed> cat", "a <mixed> cat"]:
        ref = ref_ids(pipe, [prompt])[0].tolist()
        ours = sd.tokenizer(prompt)[0].tolist()
        assert ref[:4] == [ref[0], ref[1], first, ref[3]] and first + 1 not in ref  # diffusers: one vector
        assert ours[:6] == ref[:3] + [first + 1, first + 2, ref[3]]


def test_multi_vector_prompts_count_and_cut_every_vector_as_diffusers_does(models, tmp_path):
    sd, pipe = models
    sd.load_textual_inversion(write(tmp_path / "e.safetensors", {"<long>": vectors(8, 16)}))
    pipe.load_textual_inversion(str(tmp_path / "e.safetensors"))
    prompt = "a " + " ".join(["<long>"] * 10) + " b"  # 1 + 80 + 1 tokens: more than the 75 read
    assert sd.tokenizer.num_tokens(prompt) == 82
    with pytest.warns(UserWarning, match=r"has 82 tokens but the text encoder takes 75: dropped the last 7"):
        ids = sd.tokenizer(prompt)
    assert torch.equal(ids, ref_ids(pipe, [prompt]))
    [message] = prompt_warnings(sd, [("--target", prompt)])
    assert "82 tokens" in message and "the last 7 are dropped" in message
    assert prompt_warnings(sd, [("--target", " ".join(["<long>"] * 9))]) == []  # 72 tokens fit


def test_facade_mask_inversion_and_edit_match_diffusers_on_prompts_with_the_words(models, tmp_path):
    sd, pipe = models
    multi = write(tmp_path / "m.safetensors", {"<obj>": vectors(3, 17)})
    single = write(tmp_path / "s.safetensors", {"emb_params": vectors(None, 18)})
    ours = StableDiffusionDiffEdit(sd)
    ours.load_textual_inversion([multi, single], token=["<obj>", "<style>"])
    pipe.load_textual_inversion([multi, single], token=["<obj>", "<style>"])
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    source, target, negative = "a <obj> on grass", "a <style> dog on grass", "blurry <obj>"

    def run(p):
        mask = p.generate_mask(image=image, source_prompt=source, target_prompt=target,
                               source_negative_prompt=negative, target_negative_prompt=negative,
                               num_inference_steps=STEPS, num_maps_per_mask=2,
                               generator=torch.Generator().manual_seed(1))
        latents = p.invert(prompt=source, image=image, num_inference_steps=STEPS, negative_prompt=negative,
                           generator=torch.Generator().manual_seed(2)).latents
        images = p(prompt=target, mask_image=mask, image_latents=latents, num_inference_steps=STEPS,
                   negative_prompt=negative, generator=torch.Generator().manual_seed(3), output_type="np").images
        return mask, latents, images

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers' deprecation notices
        (m1, l1, i1), (m2, l2, i2) = run(ours), run(pipe)
    assert (m1 == m2).mean() >= MASK_TOL and 0 < m2.mean() < 1
    assert ((l1 - l2).norm() / l2.norm()).item() < LATENT_TOL
    assert np.abs(i1 - i2).max() < IMAGE_TOL
    # the words matter: without them the text differs, so the test would catch prompts read without them
    ours.unload_textual_inversion()
    assert not torch.equal(ours.encode_prompt(target, "cpu", 1, False)[0], pipe.encode_prompt(
        target, "cpu", 1, False)[0])


# ----------------------------------------------------------------------------------------------------------------
# Unloading, and the base model left as it was


def test_unload_one_word_renumbers_the_rest_as_diffusers_and_unload_all_restores_the_base(models, tmp_path):
    sd, pipe = models
    base_ids, base_state = sd.tokenizer(["a cat <b>"]), {k: v.clone() for k, v in sd.text_encoder.state_dict().items()}
    with torch.no_grad():
        base_states = sd.text_encoder(base_ids)
    a, b = (write(tmp_path / f"{n}.safetensors", {f"<{n}>": vectors(None, 19 + i)}) for i, n in enumerate("ab"))
    for model in (sd, pipe):
        model.load_textual_inversion([a, b])
    assert {k: tuple(v.shape) for k, v in sd.text_encoder.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in base_state.items()}  # the base keys and shapes, rows added apart
    sd.unload_textual_inversion("<a>")
    pipe.unload_textual_inversion("<a>")
    assert_rows_match(sd, pipe, ["<b>"])
    assert_text_states_match(sd, pipe, ["a cat <b>", "<a> <b>"])
    sd.unload_textual_inversion()
    assert torch.equal(sd.tokenizer(["a cat <b>"]), base_ids) and len(sd.tokenizer) == 49408
    with torch.no_grad():
        assert torch.equal(sd.text_encoder(base_ids), base_states)
    assert all(torch.equal(v, base_state[k]) for k, v in sd.text_encoder.state_dict().items())
    assert "added_rows" not in dict(sd.text_encoder.named_buffers(recurse=True))


def test_multi_vector_word_unloads_with_all_its_vectors(models, tmp_path):
    sd, _ = models
    sd.load_textual_inversion({"<m>": vectors(3, 21)})
    sd.load_textual_inversion({"<s>": vectors(None, 22)})
    sd.unload_textual_inversion(["<m>"])
    assert [w for w in sd.tokenizer.get_vocab() if w.startswith("<m>")] == []
    assert sd.tokenizer.get_vocab()["<s>"] == 49408 and sd.text_encoder.embeddings.added_rows.shape == (1, WIDTH)
    with pytest.raises(ValueError, match="no added word '<m>'"):
        sd.unload_textual_inversion("<m>")


@pytest.mark.parametrize("tokens", [5, b"<u>", [5], [None], ["<u>", b"<u>"]])
def test_unload_with_tokens_of_the_wrong_type_is_a_type_error_naming_tokens_and_changes_nothing(models, tokens):
    """5 escaped as "'int' object is not iterable"; b"<u>" was taken as the words 60, 117, 62 ("no added word 60")."""
    sd, _ = models
    sd.load_textual_inversion({"<u>": vectors(2, 49)})
    with pytest.raises(TypeError) as e:
        sd.unload_textual_inversion(tokens)
    assert one_line_error(e) == f"tokens: expected a word (a string), a list of words, or None for all, got {tokens!r}"
    assert sd.tokenizer.added_words == [("<u>", 2)]
    sd.unload_textual_inversion(("<u>",))  # a tuple of words, as a list


def test_added_rows_follow_the_text_encoder_dtype_and_leave_the_state_dict_keys_alone(models):
    sd, _ = models
    keys = list(sd.text_encoder.state_dict())
    sd.load_textual_inversion({"<d>": vectors(2, 23)})
    try:
        sd.text_encoder.to(torch.float64)
        assert sd.text_encoder.embeddings.added_rows.dtype == torch.float64
        assert sd.text_encoder(sd.tokenizer("<d>")).dtype == torch.float64
        assert list(sd.text_encoder.state_dict()) == keys
    finally:
        sd.text_encoder.to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the problem and the fix; nothing changed


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_wrong_width_and_taken_tokens_are_refused_like_diffusers_and_change_nothing(models, tmp_path):
    sd, pipe = models
    wide = write(tmp_path / "sd2.safetensors", {"<w>": vectors(2, 24, width=WIDTH + 1)})
    with pytest.raises(WeightsError) as e:
        sd.load_textual_inversion(wide)
    assert f"embedding width {WIDTH + 1}, but this model's text encoder takes {WIDTH}" in one_line_error(e)
    with pytest.raises(ValueError):
        pipe.load_textual_inversion(wide)
    for token in ["cat", "<|endoftext|>"]:  # in the vocabulary: diffusers refuses them too
        with pytest.raises(ValueError) as e:
            sd.load_textual_inversion({token: vectors(1, 25)})
        assert f"token {token!r} is already in the tokenizer's vocabulary; pick another with token=" \
            in one_line_error(e)
        with pytest.raises(ValueError, match="already in tokenizer vocabulary"):
            pipe.load_textual_inversion({token: vectors(1, 25)})
    good = write(tmp_path / "good.safetensors", {"<g>": vectors(2, 26)})
    with pytest.raises(WeightsError):  # the second is refused: the first is not loaded either
        sd.load_textual_inversion([good, wide], token=["<g>", "<w>"])
    assert len(sd.tokenizer) == 49408 and sd.text_encoder.embeddings.added_start is None
    sd.load_textual_inversion(good)
    for token in ["<g>", "<g>_1"]:  # loaded once already; or a name one of its vectors took
        with pytest.raises(ValueError, match=f"token '{token}' is already in"):
            sd.load_textual_inversion({token: vectors(1, 27)})
    sd.load_textual_inversion({"<h>_1": vectors(1, 28)})
    for model in (sd, pipe):  # diffusers' rule: a word whose `<tok>_1` is taken
        if model is pipe:
            pipe.load_textual_inversion({"<h>_1": vectors(1, 28)})
        with pytest.raises(ValueError, match="<h>_1.*already in"):
            model.load_textual_inversion({"<h>": vectors(1, 29)})
    with pytest.raises(ValueError) as e:  # ours only: diffusers would then read a prompt's `<g>` as `<g> <g>_5`
        sd.load_textual_inversion({"<g>_5": vectors(1, 30)})
    assert "token '<g>_5' reads as a vector of the word '<g>'; pick another with token=" in one_line_error(e)


def test_a_token_the_tokenizer_reads_as_one_word_is_refused_where_diffusers_lets_it_replace_the_word(models,
                                                                                                     tmp_path):
    """diffusers refuses only vocabulary entries; CLIP's words are entries with `</w>`, so it takes "paintings" (or
    "Red", matched after lower-casing) and every prompt's word is then read as the learned one. We refuse them, from
    a state dict or a file, whatever the case, and change nothing."""
    sd, pipe = models
    prompt = ["two paintings of a red barn"]
    before = ref_ids(pipe, prompt)
    pipe.load_textual_inversion({"paintings": vectors(1, 40)})  # diffusers: accepted ...
    after = ref_ids(pipe, prompt)
    assert not torch.equal(after, before) and pipe.tokenizer.get_vocab()["paintings"] in after[0].tolist()  # hijacked
    file = write(tmp_path / "e.safetensors", {"<e>": vectors(1, 41)})
    for source, token, word in [({"paintings": vectors(1, 40)}, None, "paintings"), (file, "Red", "red"),
                                (file, "SKS", "sks"), ({"<x>": vectors(3, 42)}, "Cat", "cat")]:
        with pytest.raises(ValueError) as e:
            sd.load_textual_inversion(source, token=token)
        assert f"token {token or word!r} is already a word of the tokenizer ('{word}</w>'): every prompt's {word!r} " \
               f"would read as the learned one; pick another with token= (e.g. '<{word}>')" in one_line_error(e)
    assert len(sd.tokenizer) == 49408 and torch.equal(sd.tokenizer(prompt), before)
    sd.load_textual_inversion(file)
    with pytest.raises(ValueError, match="token '<E>' is already a word of the tokenizer \\('<e>'\\)"):
        sd.load_textual_inversion({"<E>": vectors(1, 43)})  # the loaded word in other letter case


BAD_FILES = {
    # name: (write it, the error's class, words of its one line)
    "missing": (lambda p: p, WeightsError, "not found"),
    "empty file": (lambda p: p.write_bytes(b""), WeightsError, "is empty"),
    "torch.save .pt": (lambda p: torch.save({"<t>": torch.zeros(WIDTH)}, p.with_suffix(".pt")), WeightsError,
                       "is a pickle file; diffedit loads safetensors only: convert it to .safetensors"),
    "pickle named .safetensors": (lambda p: torch.save({"<t>": torch.zeros(WIDTH)}, p), WeightsError,
                                  "is a pickle file"),
    "truncated": (lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\""), WeightsError,
                  "truncated or corrupt"),
    "no tensors": (lambda p: save_file({}, str(p)), WeightsError, "not a textual-inversion embedding (tensors: none)"),
    "two tensors": (lambda p: save_file({"<a>": torch.zeros(WIDTH), "<b>": torch.zeros(WIDTH)}, str(p)),
                    WeightsError, "not a textual-inversion embedding (tensors: <a>, <b>)"),
    "SDXL": (lambda p: save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, str(p)),
             WeightsError, "an SDXL embedding"),
    "integers": (lambda p: save_file({"<i>": torch.zeros(WIDTH, dtype=torch.int64)}, str(p)), WeightsError,
                 "not a floating-point tensor"),
    "NaN": (lambda p: save_file({"<n>": torch.full((WIDTH,), float("nan"))}, str(p)), WeightsError, "NaN"),
    "3-D": (lambda p: save_file({"<3>": torch.zeros(1, 2, WIDTH)}, str(p)), WeightsError, "(D,) or (n, D)"),
    "no vectors": (lambda p: save_file({"<0>": torch.zeros(0, WIDTH)}, str(p)), WeightsError, "(D,) or (n, D)"),
    "folder with a pickle": (lambda p: (p.mkdir(), torch.save({}, p / "learned_embeds.bin")), WeightsError,
                             "learned_embeds.bin is a pickle file"),
    "empty folder": (lambda p: p.mkdir(), WeightsError, "has no learned_embeds.safetensors"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_embedding_files_are_refused_in_one_line_naming_the_file(tmp_path, case):
    make, error, words = BAD_FILES[case]
    path = tmp_path / "emb.safetensors"
    make(path)
    if case == "torch.save .pt":
        path = path.with_suffix(".pt")
    with pytest.raises(error) as e:
        read_embedding(path)
    message = one_line_error(e)
    assert words in message and str(path) in message


@pytest.mark.parametrize("args, words", [
    (([{"<a>": torch.zeros(WIDTH)}, {"<b>": torch.zeros(WIDTH)}], ["<a>"]), "2 embedding(s) and 1 tokens"),
    (([{"<a>": torch.zeros(WIDTH)}, {"<b>": torch.zeros(WIDTH)}], ["<x>", "<x>"]), "duplicate tokens"),
    (([{"<a>": torch.zeros(2, WIDTH)}, {"<a>": torch.zeros(WIDTH)}], None), "token '<a>' is given twice"),
    ((torch.zeros(WIDTH), None), "needs its token: pass token="),
    ((torch.zeros(3, WIDTH), ["<a>", "<b>"]), "a tensor of 3 embeddings with 2 tokens"),
    (({"emb_params": torch.zeros(WIDTH)}, None), "names no token; pass token="),
    (({"<a>": torch.zeros(WIDTH)}, "two words"), "without spaces"),
    (({"<a>": torch.zeros(WIDTH)}, ""), "non-empty"),
    # one token for two files was "duplicate tokens: ['<x>', '<x>']", a list the caller never wrote
    (([{"<a>": torch.zeros(WIDTH)}, {"<b>": torch.zeros(WIDTH)}], "<x>"),
     "2 embeddings and one token '<x>': give token=[...] with one token (or None: the file's own) per embedding"),
])
def test_bad_arguments_are_refused_in_one_line(models, args, words):
    sd, _ = models
    with pytest.raises(ValueError) as e:
        sd.load_textual_inversion(*args)
    assert words in one_line_error(e)
    assert len(sd.tokenizer) == 49408


@pytest.mark.parametrize("token", [5, b"<a>", ("<a>",), ["<a>", 5]])
def test_a_token_of_the_wrong_type_is_a_type_error_naming_token(models, token):
    """They were ValueErrors ("the token must be a non-empty text without spaces, got 5"), which said neither that
    the type was wrong nor which argument held it."""
    sd, _ = models
    sources = [{"<a>": torch.zeros(WIDTH)}, {"<b>": torch.zeros(WIDTH)}] if isinstance(token, list) else \
        {"<a>": torch.zeros(WIDTH)}
    with pytest.raises(TypeError) as e:
        sd.load_textual_inversion(sources, token=token)
    assert one_line_error(e).startswith("token: expected a string, None (the file's own) or a list of them, got ")
    assert len(sd.tokenizer) == 49408


def test_a_trainable_tensor_is_loaded_as_a_copy_of_its_values_as_diffusers_copies_it(models):
    """A vector that requires grad (an nn.Parameter fresh from training) became a buffer holding its autograd graph:
    the text states required grad and `copy.deepcopy(text_encoder)` failed ("Only Tensors created explicitly by the
    user (graph leaves) support the deepcopy protocol"). diffusers assigns `.data`, a plain copy."""
    sd, pipe = models
    trained = torch.nn.Parameter(vectors(2, 44))
    sd.load_textual_inversion({"<trained>": trained})
    pipe.load_textual_inversion({"<trained>": trained})
    assert not sd.text_encoder.embeddings.added_rows.requires_grad
    assert not any(p.requires_grad for p in sd.text_encoder.parameters())  # so the states need no grad at all
    assert not sd.text_encoder(sd.tokenizer("a <trained>")).requires_grad
    copy.deepcopy(sd.text_encoder)
    with torch.no_grad():
        trained.add_(1.0)  # training goes on: the loaded word keeps the values it was loaded with
    assert_rows_match(sd, pipe, ["<trained>", "<trained>_1"])


def test_an_embedding_that_overflows_a_float16_text_encoder_is_refused_and_changes_nothing(models):
    """It loaded as rows of inf (the cast to the text encoder's float16), so every prompt with the word gave NaN
    states: a result that cannot be right, refused as non-finite weights are at load (docs/design.md §5)."""
    sd, _ = models
    sd.text_encoder.to(torch.float16)
    try:
        with pytest.raises(WeightsError) as e:
            sd.load_textual_inversion([{"<ok>": vectors(1, 45)}, {"<big>": torch.full((2, WIDTH), 7e4)}])
        assert one_line_error(e) == ("state dict: the embedding overflows float16 (values up to 7e+04), the text "
                                     "encoder's dtype; load the model in float32")
        assert len(sd.tokenizer) == 49408 and sd.text_encoder.embeddings.added_start is None
        sd.load_textual_inversion({"<ok>": vectors(1, 45)})  # in range: loaded in float16
        assert sd.text_encoder.embeddings.added_rows.dtype == torch.float16
    finally:
        sd.text_encoder.to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# The command line: --embedding FILE[:TOKEN] on edit, mask and invert (the shipped model: width 128)

CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}


def cli(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffedit", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=CLI_ENV)


def assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2 and one `diffedit: error:` line holding every fragment, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("diffedit: error: "), result.stderr
    assert all(f in lines[0] for f in fragments), (fragments, lines[0])


@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    PIL.Image.new("RGB", (64, 64), (200, 40, 40)).save(folder / "in.png")
    save_file({"<obj>": vectors(3, 40, width=128)}, str(folder / "obj.safetensors"))
    save_file({"<narrow>": vectors(2, 41)}, str(folder / "narrow.safetensors"))
    torch.save({"string_to_param": {"*": vectors(1, 42, width=128)}}, folder / "a1111.pt")
    return folder


def test_cli_embedding_is_read_by_the_mask_and_changes_it(cli_folder):
    args = ["mask", "in.png", "--source", "a red picture", "--target", "a <mine> picture", "--steps", "4",
            "--num-maps", "2"]
    with_it = cli(*args, "-o", "m1.png", "--heatmap-out", "h1.png", "--embedding", "obj.safetensors:<mine>",
                  "--json", cwd=cli_folder)
    assert with_it.returncode == 0, with_it.stderr
    assert json.loads(with_it.stdout)["embeddings"] == [{"file": "obj.safetensors", "token": "<mine>"}]
    without = cli(*args, "-o", "m2.png", "--heatmap-out", "h2.png", "--json", cwd=cli_folder)
    assert without.returncode == 0, without.stderr
    assert json.loads(without.stdout)["embeddings"] == []
    assert (cli_folder / "h1.png").read_bytes() != (cli_folder / "h2.png").read_bytes()


@pytest.mark.parametrize("embedding, fragments", [
    ("narrow.safetensors", ["--embedding", "narrow.safetensors: embedding width 32, but this model's text encoder "
                                           "takes 128"]),
    ("obj.safetensors:a", ["--embedding", "token 'a' is already in the tokenizer's vocabulary"]),
    ("a1111.pt", ["--embedding a1111.pt:", "is a pickle file", "convert it to .safetensors"]),
    ("missing.safetensors:<x>", ["--embedding missing.safetensors:", "not found"]),
])
def test_cli_bad_embedding_exits_2_with_one_line_and_writes_nothing(cli_folder, embedding, fragments):
    result = cli("invert", "in.png", "--prompt", "a <x>", "-o", "never.safetensors", "--steps", "2",
                 "--embedding", embedding, cwd=cli_folder)
    assert_refused(result, *fragments)
    assert not (cli_folder / "never.safetensors").exists()


@pytest.mark.parametrize("text, parsed", [
    ("e.safetensors", ("e.safetensors", None)),
    ("e.safetensors:<tok>", ("e.safetensors", "<tok>")),
    ("dir/with:colon/e.safetensors:tok", ("dir/with:colon/e.safetensors", "tok")),
])
def test_cli_embedding_argument_splits_the_token_at_the_last_colon(text, parsed):
    assert embedding_arg(text) == parsed


def test_cli_embedding_argument_keeps_an_existing_path_with_a_colon_whole(tmp_path):
    path = tmp_path / "a:b.safetensors"
    path.write_bytes(b"x")
    assert embedding_arg(str(path)) == (str(path), None)
