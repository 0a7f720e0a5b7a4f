"""What the shipped model is: the small CLIP vocabulary spells the world exactly as CLIP does, and the edit
defaults it ships are the ones its definition exports."""

import json

import torch

import diffedit
from diffedit import shapes, shipped_model
from diffedit.models.tokenizer import CLIPTokenizer


def test_small_vocabulary_spells_the_world_like_full_clip(tmp_path):
    shipped_model.write_tokenizer(tmp_path)
    small, full = CLIPTokenizer.from_folder(tmp_path), CLIPTokenizer.default()
    small_vocab = {i: t for t, i in json.loads((tmp_path / "vocab.json").read_text()).items()}
    full_vocab = {i: t for t, i in json.loads((shipped_model.CLIP_VOCAB_DIR / "vocab.json").read_text()).items()}
    world = shapes.all_captions() + ["", "A  RED Circle on a  gray background", "orange triangle"]
    for prompt, a, b in zip(world, small(world), full(world)):
        assert [small_vocab[int(i)] for i in a] == [full_vocab[int(i)] for i in b], prompt
    # Other words fall back to smaller pieces (down to bytes) that spell the same text: never an unknown token
    other = ["a cat on a mat!", "été 2024", "an ORANGE hexagon"]
    for prompt in other:
        spelled = ["".join(vocab[i] for i in tok(prompt)[0, 1:1 + tok.num_tokens(prompt)].tolist())
                   for tok, vocab in ((small, small_vocab), (full, full_vocab))]
        assert spelled[0] == spelled[1], prompt
    # Each world word is one token, as in CLIP; the vocabulary is bytes + the merges they need + 2 specials
    for word in shipped_model.WORLD_WORDS:
        assert small.num_tokens(word) == 1
    assert len(small_vocab) == 512 + len(shipped_model.small_clip_vocab()[1]) + 2
    assert small.pad_token_id == small.eos_token_id == len(small_vocab) - 1


def test_small_vocabulary_matches_transformers_tokenizer(tmp_path):
    from transformers import CLIPTokenizer as ReferenceTokenizer

    shipped_model.write_tokenizer(tmp_path)
    prompts = shapes.all_captions()[:10] + ["", "a yellow blob?"]
    ref = ReferenceTokenizer.from_pretrained(str(tmp_path))(prompts, padding="max_length", max_length=77,
                                                            truncation=True, return_tensors="pt").input_ids
    assert torch.equal(CLIPTokenizer.from_folder(tmp_path)(prompts), ref)


def test_shipped_edit_defaults_are_what_training_exports():
    # a retrain with --install must reproduce the shipped diffedit.json; tuning one and not the other fails here
    assert json.loads((diffedit.SHIPPED_MODEL / "diffedit.json").read_text()) == shipped_model.EDIT_DEFAULTS
