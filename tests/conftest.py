import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    """A randomly initialised tiny T5 saved in the real checkpoint layout (no hub access)."""
    from cascade.data.synthetic import all_captions
    from cascade.nn.text import build_tiny_t5

    return build_tiny_t5(tmp_path_factory.mktemp("t5") / "t5", all_captions(), dim=64)
