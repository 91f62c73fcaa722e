"""Puts the repository root on sys.path so the tests can `import train_gpt`. Nothing else."""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch

# The tests use tiny tensors: on a 2-core CI machine, thread fan-out costs more than it saves.
torch.set_num_threads(1)
