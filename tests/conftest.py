import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the oracle helpers

import torch

# pytest-xdist runs one worker per core: torch's own threads on top would oversubscribe the
# machine and make small matmuls tens of times slower.
torch.set_num_threads(1)
