import pytest
import torch


@pytest.fixture(autouse=True)
def _fixed_global_seed():
    # Model initialisation in tests uses the global RNG; fix it so every test is reproducible.
    torch.manual_seed(1234)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
