"""The internal record of one procedural sample (DATA.md section 4): eval item + ground-truth edit.

    Record(id="maze-000123", family="maze", image=<PIL input>, question="You are a maze solver. ...",
           candidates=None, answer="D,D,R,R", answer_type="moves",
           edit_prompt="Draw the shortest path of the maze in blue. You are a maze solver. ...",
           target_image=<PIL target edit>, meta={...})

Export mapping (export.py): SFT `edit_image` = image, `image` = target_image, `prompt` = edit_prompt;
GRPO `source_image` = image, `instruction` = edit_prompt, `qa_list` = [{question: qa_question(), answer}].
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Optional

from PIL import Image

ANSWER_TYPES = ("moves", "perm", "letter", "int", "text")


def png_bytes(img: Image.Image) -> bytes:
    """Lossless, deterministic PNG encoding (same pixels -> same bytes)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Record:
    id: str  # unique over all families, e.g. "maze-000123"
    family: str  # maze | frozenlake | jigsaw | perception | chart | 3d: the image folder in exports
    image: Image.Image  # input / condition image (RGB)
    question: str  # question text without the editor prefix
    candidates: Optional[str]  # "A: ...; B: ..." for multiple choice, else None
    answer: str  # ground truth in the benchmark's own format ("D,R,R", "1-2-0", "C", ...)
    answer_type: str  # one of ANSWER_TYPES
    edit_prompt: str  # editor instruction: family prefix + question
    target_image: Image.Image  # ground-truth edit (RGB)
    meta: dict[str, Any] = field(default_factory=dict)  # what the family's eval file and scorer need
    _png: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # encode once

    def __post_init__(self):
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(f"record {self.id}: answer_type {self.answer_type!r} not in {ANSWER_TYPES}")
        for name in ("image", "target_image"):
            img = getattr(self, name)
            if not isinstance(img, Image.Image):
                raise TypeError(f"record {self.id}: {name} must be a PIL image, got {type(img).__name__}")
            if img.mode != "RGB":
                setattr(self, name, img.convert("RGB"))
        if not self.question or not self.edit_prompt:
            raise ValueError(f"record {self.id}: empty question or edit_prompt (a CSV would read it back as NaN)")

    def image_png(self) -> bytes:
        if "image" not in self._png:
            self._png["image"] = png_bytes(self.image)
        return self._png["image"]

    def target_png(self) -> bytes:
        if "target" not in self._png:
            self._png["target"] = png_bytes(self.target_image)
        return self._png["target"]

    def qa_question(self) -> str:
        """The question of the GRPO qa pair; with candidates, the DL3DV-2k concatenation (no separator)."""
        if self.candidates is None:
            return self.question
        return "Question: " + self.question + "Candidates: " + self.candidates
