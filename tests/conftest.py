import pytest
import torch

from meestral.backbones.loading import random_backbone

TINY = ["mistral", "llama", "mamba2", "mamba", "mistral-sw"]


@pytest.fixture(scope="session")
def tiny():
    """Tiny random backbones by shape name, built once per session."""
    cache = {}

    def get(shape, seed=0):
        if (shape, seed) not in cache:
            cache[(shape, seed)] = random_backbone(shape, seed=seed)
        return cache[(shape, seed)]

    return get


def pytest_configure(config):
    torch.set_num_threads(2)
