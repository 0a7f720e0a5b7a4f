"""Parity of models.clip_text.CLIPTextModel with transformers 5.24's CLIPTextModel (the oracle diffusers uses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from diffedit.models.clip_text import CLIPTextModel
from diffedit.models.config import CLIPTextConfig
from diffedit.official_configs import SD15_TEXT, SD21_TEXT

torch.set_num_threads(1)

TINY = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 37,
        "vocab_size": 1000, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
        "bos_token_id": 998, "eos_token_id": 999, "pad_token_id": 1}
SD1_STYLE = {**TINY, "hidden_act": "quick_gelu"}
SD2_STYLE = {**TINY, "hidden_act": "gelu"}
STYLES = pytest.mark.parametrize("raw", [SD1_STYLE, SD2_STYLE], ids=["sd1-quick_gelu", "sd2-gelu"])


def _our_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's state_dict in our naming: no `text_model.` prefix, no position_ids buffer."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def _pair(raw: dict, attn: str = "sdpa") -> tuple[transformers.CLIPTextModel, CLIPTextModel]:
    """A reference with randomized weights (norm affines included) and ours holding a strict copy of them."""
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**raw, attn_implementation=attn)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    ours = CLIPTextModel(CLIPTextConfig.from_dict(raw)).eval()
    ours.load_state_dict(_our_keys(ref.state_dict()), strict=True)
    return ref, ours


def _ids(raw: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, raw["vocab_size"], (3, raw["max_position_embeddings"]), generator=g)


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@STYLES
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_last_hidden_state_matches_transformers(raw, attn):
    ref, ours = _pair(raw, attn)
    ids = _ids(raw)
    with torch.no_grad():
        expected = ref(ids).last_hidden_state
        got = ours(ids)
    assert got.shape == (3, 77, 32)
    _close(got, expected)


@STYLES
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_matches_diffusers_recipe(raw, clip_skip):
    # diffusers' encode_prompt: hidden_states[-(clip_skip + 1)] of output_hidden_states=True, then final_layer_norm.
    ref, ours = _pair(raw)
    ids = _ids(raw)
    with torch.no_grad():
        hidden = ref(ids, output_hidden_states=True).hidden_states
        assert len(hidden) == raw["num_hidden_layers"] + 1  # embeddings, then each layer's output
        expected = ref.final_layer_norm(hidden[-(clip_skip + 1)])
        got = ours(ids, clip_skip=clip_skip)
    _close(got, expected)


def test_clip_skip_extremes_follow_the_same_recipe():
    ref, ours = _pair(SD1_STYLE)
    ids = _ids(SD1_STYLE)
    n = SD1_STYLE["num_hidden_layers"]
    with torch.no_grad():
        hidden = ref(ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(ours(ids, clip_skip=0), ours(ids))  # diffusers: hidden[-1] + final LN
        _close(ours(ids, clip_skip=n), ref.final_layer_norm(hidden[0]))  # the normalized embeddings


def test_shorter_sequences_and_batch_rows_are_independent():
    ref, ours = _pair(SD2_STYLE)
    ids = _ids(SD2_STYLE)[:, :20]
    with torch.no_grad():
        _close(ours(ids), ref(ids).last_hidden_state)
        _close(ours(ids[1:2]), ours(ids)[1:2])


@pytest.mark.parametrize("bad", [-1, 5, 1.0, True, "1"])
def test_rejects_out_of_range_clip_skip(bad):
    _, ours = _pair(SD1_STYLE)
    with pytest.raises(ValueError, match="clip_skip"):
        ours(_ids(SD1_STYLE), clip_skip=bad)


def test_clip_skip_as_a_numpy_integer_is_the_int_it_equals():
    """np.int64(1) was refused as "must be None or an integer"; diffusers' hidden_states[-(clip_skip + 1)] takes it."""
    _, ours = _pair(SD1_STYLE)
    ids = _ids(SD1_STYLE)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, clip_skip=np.int64(2)), ours(ids, clip_skip=2), rtol=0, atol=0)


@pytest.mark.parametrize("bad, error, words", [
    ([[1, 2, 3]], TypeError, "input_ids: expected a torch.long tensor of token ids (what the tokenizer returns), "
                             "got list"),
    (torch.zeros(1, 5), TypeError, "got torch.float32"),
    (torch.full((1, 5), 1000), ValueError, "input_ids: token id 1000 has no embedding row (ids in [0, 1000)): ids "
                                           "from another model's tokenizer, or a word unloaded since"),
    (torch.tensor([[998, -1, 999]]), ValueError, "token id -1 has no embedding row"),
])
def test_input_ids_that_are_not_token_ids_of_this_model_are_refused_naming_input_ids(bad, error, words):
    """They escaped from inside the embedding lookup as AttributeError ('list' object has no attribute 'ndim'),
    RuntimeError (Expected tensor for argument #1 'indices' ...) or IndexError (index out of range in self; on CUDA
    a device-side assert that ends the process's use of the GPU)."""
    _, ours = _pair(SD1_STYLE)
    with pytest.raises(error) as e:
        ours(bad)
    assert type(e.value) is error and words in str(e.value)


def test_ids_of_added_rows_are_valid_and_ids_past_them_are_refused():
    ref, ours = _pair(SD1_STYLE)
    ours.embeddings.set_added_rows(1000, torch.randn(2, 32))
    with torch.no_grad():
        ours(torch.tensor([[998, 1000, 1001, 999]]))
        with pytest.raises(ValueError, match=r"token id 1002 has no embedding row \(ids in \[0, 1000\) or "
                                             r"\[1000, 1002\)\)"):
            ours(torch.tensor([[998, 1002, 999]]))
        ids = _ids(SD1_STYLE)  # int32 ids, as nn.Embedding takes them, give the same states
        torch.testing.assert_close(ours(ids.int()), ref(ids).last_hidden_state, rtol=1e-4,
                                   atol=1e-4 * ref(ids).last_hidden_state.abs().max().item())


def test_rejects_sequences_longer_than_the_position_table():
    _, ours = _pair(SD1_STYLE)
    with pytest.raises(ValueError, match="input_ids"):
        ours(torch.zeros(1, 78, dtype=torch.long))


def test_follows_module_dtype():
    _, ours = _pair(SD1_STYLE)
    ours = ours.to(torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    assert ours(_ids(SD1_STYLE)).dtype == torch.bfloat16


@pytest.mark.parametrize("raw", [SD15_TEXT, SD21_TEXT], ids=["sd15", "sd21"])
def test_full_size_state_dict_keys_and_shapes_match_transformers(raw):
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**raw))
        ours = CLIPTextModel(CLIPTextConfig.from_dict(raw))
    expected = {k: tuple(v.shape) for k, v in _our_keys(ref.state_dict()).items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == expected
    assert not any("position_ids" in k for k in got)


@pytest.mark.parametrize("field, value, words", [
    ("num_attention_heads", 5, "num_attention_heads=5 must divide hidden_size=32"),
    ("num_attention_heads", 64, "num_attention_heads=64 must divide hidden_size=32"),
    ("hidden_size", "32", "hidden_size='32' must be an int >= 1"),
    ("num_hidden_layers", 2.0, "num_hidden_layers=2.0 must be an int >= 1"),
    ("vocab_size", True, "vocab_size=True must be an int >= 1"),
    ("layer_norm_eps", float("nan"), "layer_norm_eps=nan must be a positive number"),
])
def test_config_values_that_cannot_run_are_refused_at_parse_time_naming_the_field(field, value, words):
    """They used to load and fail at the first forward pass (heads not dividing the width), or escape as a raw
    TypeError."""
    with pytest.raises(ValueError) as e:
        CLIPTextConfig.from_dict({**SD1_STYLE, field: value})
    assert type(e.value).__name__ == "ConfigError" and str(e.value).startswith(f"text_encoder config: {words}")


@pytest.mark.parametrize("heads", [5, 64])
def test_heads_that_do_not_divide_the_width_are_refused_as_transformers_refuses_them(heads):
    with pytest.raises(Exception, match="not a multiple of the number of attention heads"):  # its config validator
        transformers.CLIPTextModel(transformers.CLIPTextConfig(**{**SD1_STYLE, "num_attention_heads": heads}))
    with pytest.raises(ValueError, match=f"num_attention_heads={heads} must divide hidden_size=32"):
        CLIPTextConfig.from_dict({**SD1_STYLE, "num_attention_heads": heads})
