"""Edits with etchr_eval's Editor for SFT/tests/test_learning.py (run as a subprocess: SFT never imports etchr_eval)."""
import json, sys
from omegaconf import OmegaConf
from PIL import Image
from etchr_eval.config import EditorConfig
from etchr_eval.editor import Editor
job = json.loads(sys.argv[1])
editor = Editor(OmegaConf.merge(OmegaConf.structured(EditorConfig), job["editor"]), job["cache"])
for source, prompt, out in job["edits"]:
    with Image.open(source) as im:
        editor.edit(im.convert("RGB"), prompt, job["seed"])[0].save(out)
