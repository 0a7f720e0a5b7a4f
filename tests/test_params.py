"""diffedit.params: named presets, layered between a model's stored editing defaults and explicit overrides."""

import pytest

from diffedit.params import PRESETS, DiffEditParams, layered, with_preset

# The shipped model's stored defaults that the fast preset changes or keeps (its diffedit.json).
STORED = {"num_inference_steps": 25, "inpaint_strength": 0.6, "num_maps_per_mask": 10}


def test_no_preset_gives_the_overrides_back_as_a_new_dict():
    overrides = {"guidance_scale": 3.0}
    result = with_preset(None, overrides)
    assert result == overrides and result is not overrides


def test_the_fast_preset_sits_over_the_stored_defaults_and_under_explicit_overrides():
    p = layered(STORED, with_preset("fast", {}))
    assert p.num_inference_steps == 15  # the preset over the stored defaults
    assert p.num_maps_per_mask == 10 and p.inpaint_strength == 0.6  # stored defaults the preset does not name
    assert layered(STORED, with_preset("fast", {"num_inference_steps": 20})).num_inference_steps == 20  # explicit
    assert layered({}, with_preset("fast", {})).num_inference_steps == 15  # over DiffEditParams' 50 too


def test_an_override_equal_to_the_presets_value_changes_nothing_and_every_preset_is_valid():
    for name, fields in PRESETS.items():
        DiffEditParams().updated(fields)  # names and values valid on their own
        assert with_preset(name, dict(fields)) == fields


def test_an_unknown_or_mistyped_preset_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="preset 'slow': choose from fast"):
        with_preset("slow", {})
    with pytest.raises(ValueError, match="preset 'Fast'"):  # names are exact
        with_preset("Fast", {})
    with pytest.raises(TypeError, match="preset: expected a preset name"):
        with_preset(["fast"], {})
