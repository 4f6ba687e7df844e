import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "multiprocess: launches several processes (torch.distributed, gloo on CPU); runs in CI")
