import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "multiprocess: launches several processes (torch.distributed, gloo on CPU); runs in CI"
    )


@pytest.fixture(autouse=True)
def _private_cache_home(tmp_path_factory, monkeypatch):
    """Tests never read or write the user's caches (e.g. measured costs under ~/.cache/apar-spec)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A test that sets torch's thread count (the fp32 SmolLM2 tests use 1) does not leak it into later tests."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
