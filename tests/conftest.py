import pytest
import torch

CUDA = torch.cuda.is_available()


def devices():
    """The devices a test runs on: CPU always, CUDA where a GPU is visible (as params marked `cuda`)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="no CUDA device visible")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
