import pytest
import torch

from tiny_checkpoints import save_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory):
    """A tiny SD1-style checkpoint (conv projections, epsilon) saved by diffusers."""
    return save_checkpoint("sd1", tmp_path_factory.mktemp("sd1"))


@pytest.fixture(scope="session")
def sd2_folder(tmp_path_factory):
    """A tiny SD2-style checkpoint (linear projections, per-level heads, upcast attention, v_prediction)."""
    return save_checkpoint("sd2", tmp_path_factory.mktemp("sd2"))
