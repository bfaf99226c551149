"""Loads a pipeline dir with etchr_rl's loader for SFT/tests/test_merge_prepare.py (a subprocess: SFT never imports etchr_rl)."""
import hashlib, sys, torch
from etchr_rl.model import load_pipeline
pipe = load_pipeline(sys.argv[1], torch.float32)
h = hashlib.sha256()
for k, v in sorted(pipe.transformer.state_dict().items()):
    h.update(k.encode()); h.update(v.detach().contiguous().numpy().tobytes())
print(type(pipe).__name__, h.hexdigest())
