import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "models" / "toy_vlms.py"
sys.path.insert(0, str(ROOT / "tests" / "models"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(1)
