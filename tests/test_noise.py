"""Noise drawn as diffusers draws it: one row per generator of a list, and, our extension, a block of rows per
generator that equals what that generator draws for its image alone."""

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from diffedit.schedulers.noise import randn

CPU = torch.device("cpu")


def test_one_generator_and_one_per_row_match_diffusers_randn_tensor():
    shape = (3, 4, 8, 8)
    ours = randn(shape, torch.Generator().manual_seed(5), CPU, torch.float32)
    theirs = randn_tensor(shape, generator=torch.Generator().manual_seed(5), device=CPU, dtype=torch.float32)
    assert torch.equal(ours, theirs)
    ours = randn(shape, [torch.Generator().manual_seed(s) for s in (1, 2, 3)], CPU, torch.float32)
    theirs = randn_tensor(shape, generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3)], device=CPU,
                          dtype=torch.float32)
    assert torch.equal(ours, theirs)


def test_a_block_of_rows_per_generator_is_what_each_draws_alone():
    """Two images with three noise draws each: rows 0-2 from generator 0, in one draw of three rows."""
    batched = randn((6, 4, 5, 5), [torch.Generator().manual_seed(s) for s in (7, 8)], CPU, torch.float32)
    for i, s in enumerate((7, 8)):
        alone = randn((3, 4, 5, 5), torch.Generator().manual_seed(s), CPU, torch.float32)
        assert torch.equal(batched[3 * i : 3 * i + 3], alone)


def test_generators_that_do_not_divide_the_batch_are_refused():
    with pytest.raises(ValueError, match="got 2 generators for a batch of 3"):
        randn((3, 4), [torch.Generator(), torch.Generator()], CPU, torch.float32)


@pytest.mark.parametrize("generator", [0, "seed", [], [torch.Generator(), 3], [torch.Generator(), None]])
def test_a_generator_that_is_not_one_is_a_type_error_naming_it(generator):
    """A seed passed as the generator was AttributeError: 'int' object has no attribute 'device'; [] an IndexError."""
    with pytest.raises(TypeError, match="generator: expected None, a torch.Generator or a non-empty list"):
        randn((2, 4), generator, CPU, torch.float32)
