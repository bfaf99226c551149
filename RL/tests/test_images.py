"""The image rule (etchr_rl.images) on every image kind, the trainer's source loader, and prepare_data.py on
truncated images."""

from __future__ import annotations

import importlib.util
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from etchr_rl.data import read_jsonl
from etchr_rl.images import ImageError, check_encoded, open_rgb8, oriented_size, to_rgb8

RL_DIR = Path(__file__).resolve().parents[1]
REPO = RL_DIR.parent
IMAGE_TYPE = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
GRADIENT16 = np.linspace(0, 65535, 1024).round().astype(np.uint16)  # one row, 0..65535


# ----------------------------------------------------------------------------------------------
# Image makers
# ----------------------------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png16(arr: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB): arr (H, W[, C]) uint16."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def grey16_png() -> bytes:
    return encode(Image.frombytes("I;16", (1024, 4), np.tile(GRADIENT16, (4, 1)).astype("<u2").tobytes()))


def exif6_png() -> bytes:
    """4x2, red at (0, 0), EXIF orientation 6 (displayed rotated 90 degrees clockwise)."""
    img = Image.new("RGB", (4, 2), (0, 0, 200))
    img.putpixel((0, 0), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6
    return encode(img, exif=exif)


def noise(size=(48, 40), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def truncated_jpeg() -> bytes:
    data = encode(noise(), "JPEG")
    return data[: len(data) // 2]


def truncated_png() -> bytes:
    data = encode(noise(seed=1), "PNG")
    return data[: len(data) // 2]


def pixels(img: Image.Image) -> list:
    """The first row's pixels."""
    return [img.getpixel((x, 0)) for x in range(img.width)]


def levels(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.dtype == np.uint8
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[0, :, 0]


# ----------------------------------------------------------------------------------------------
# The rule, kind by kind
# ----------------------------------------------------------------------------------------------
def test_16bit_grey_png_keeps_its_gradient():
    img = open_rgb8(grey16_png())
    row = levels(img)
    assert len(np.unique(row)) >= 250 and (np.diff(row.astype(int)) >= 0).all()
    assert (row[0], row[-1]) == (0, 255)
    assert (row == (GRADIENT16 >> 8)).all()  # the documented high byte
    with Image.open(io.BytesIO(grey16_png())) as im:  # what a bare convert("RGB") did: saturated
        bare = np.asarray(im.convert("RGB"))
        assert len(np.unique(bare)) <= 8 and (bare == 255).mean() > 0.9


@pytest.mark.parametrize("mode,dtype", [("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2"), ("I", "<i4")])
def test_16bit_modes_in_memory(mode, dtype):
    img = Image.frombytes(mode, (1024, 1), GRADIENT16.astype(dtype).tobytes())
    row = levels(to_rgb8(img))
    assert (row == (GRADIENT16 >> 8)).all() and len(np.unique(row)) == 256


def test_32bit_integer_beyond_16_bits_is_an_error():
    img = Image.fromarray(np.array([[0, 70000]], dtype=np.int32))
    with pytest.raises(ImageError, match="x.png: 32-bit integer image with values 0..70000"):
        to_rgb8(img, "x.png")


def test_16bit_rgb_png_is_the_high_byte():
    rgb = np.stack([np.tile(GRADIENT16, (2, 1)), np.tile(GRADIENT16[::-1], (2, 1)),
                    np.full((2, 1024), 0x1234, np.uint16)], -1)
    arr = np.asarray(open_rgb8(png16(rgb, 2)))
    assert (arr[0, :, 0] == GRADIENT16 >> 8).all() and (arr[0, :, 1] == GRADIENT16[::-1] >> 8).all()
    assert (arr[..., 2] == 0x12).all() and len(np.unique(arr[..., 0])) == 256


def test_float_images():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert list(levels(to_rgb8(unit))) == [0, 128, 255]  # x 255, rounded (127.5 -> 128)
    byte = Image.fromarray(np.array([[0.0, 2.4, 254.6]], dtype=np.float32))
    assert list(levels(to_rgb8(byte))) == [0, 2, 255]
    with pytest.raises(ImageError, match="values -1..300"):
        to_rgb8(Image.fromarray(np.array([[-1.0, 300.0]], dtype=np.float32)))
    with pytest.raises(ImageError, match="NaN"):
        to_rgb8(Image.fromarray(np.array([[0.5, np.nan]], dtype=np.float32)))


def test_palette_with_transparency_is_white_where_transparent():
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    data = encode(p, transparency=0)  # index 0 (red) is transparent
    assert pixels(open_rgb8(data)) == [(255, 255, 255), (0, 255, 0)]
    pa_img = Image.new("PA", (1, 1))
    pa_img.putpalette([0, 0, 255] + [0] * 765)
    pa_img.putpixel((0, 0), (0, 0))  # palette index 0, alpha 0
    assert to_rgb8(pa_img).getpixel((0, 0)) == (255, 255, 255)


def test_rgba_and_la_are_composited_on_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 128), (0, 0, 0, 0), (10, 20, 30, 255)])
    # c * a/255 + 255 * (1 - a/255): red at a = 128 -> (255, 127, 127); fully transparent black -> white
    assert pixels(open_rgb8(encode(rgba))) == [(255, 127, 127), (255, 255, 255), (10, 20, 30)]
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 128), (200, 255)])
    assert pixels(open_rgb8(encode(la))) == [(127, 127, 127), (200, 200, 200)]


def test_grey_and_bilevel():
    assert open_rgb8(encode(Image.new("L", (1, 1), 77))).getpixel((0, 0)) == (77, 77, 77)
    one = Image.new("1", (2, 1))
    one.putpixel((1, 0), 1)
    assert pixels(open_rgb8(encode(one))) == [(0, 0, 0), (255, 255, 255)]


def test_cmyk():
    assert to_rgb8(Image.new("CMYK", (1, 1), (100, 0, 0, 50))).getpixel((0, 0)) == (125, 205, 205)  # (255-C)(255-K)/255
    jpeg = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)
    with Image.open(io.BytesIO(jpeg)) as im:
        assert im.mode == "CMYK"
    r, g, b = open_rgb8(jpeg).getpixel((4, 4))
    assert r >= 250 and g <= 5 and b <= 5  # red, up to JPEG loss


def test_exif_orientation_is_applied_first():
    data = exif6_png()
    img = open_rgb8(data)
    assert img.size == (2, 4) and img.getpixel((1, 0)) == (255, 0, 0) and img.getpixel((0, 0)) == (0, 0, 200)
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (4, 2) and oriented_size(im) == (2, 4)
    assert check_encoded(data) == ("PNG", 2, 4)


def test_truncated_and_damaged_files_fail_decoding(monkeypatch):
    jpeg = truncated_jpeg()
    with Image.open(io.BytesIO(jpeg)) as im:
        im.verify()  # passes: verify alone does not catch a truncated JPEG
    with pytest.raises(ImageError, match="s.parquet row 3: image could not be decoded .*truncated"):
        open_rgb8(jpeg, "s.parquet row 3")
    for data in (jpeg, truncated_png(), b"not an image"):
        with pytest.raises(ImageError, match="image could not be decoded"):
            check_encoded(data, "w")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageError, match="LOAD_TRUNCATED_IMAGES is on"):
        open_rgb8(encode(noise()))


def test_the_three_trees_hold_the_same_rule():
    copies = [REPO / "SFT" / "etchr_sft" / "images.py", REPO / "RL" / "etchr_rl" / "images.py",
              REPO / "Evaluation" / "etchr_eval" / "images.py"]
    texts = {p.read_text() for p in copies}
    assert len(texts) == 1, "the image rule differs between trees: keep the three copies identical"


# ----------------------------------------------------------------------------------------------
# prepare_data.py (subprocess) and the trainer's source loader
# ----------------------------------------------------------------------------------------------
MAZE = "Draw the shortest path of the maze in blue. Find the moves."
QA = "{'question': 'Find the moves.', 'answer': 'D,R'}"


def _shard(path: Path, sources: list, targets: list) -> Path:
    n = len(sources)
    cols = {"source_image": pa.array([[{"bytes": b, "path": f"{i}.png"}] for i, b in enumerate(sources)], IMAGE_TYPE),
            "instruction": pa.array([MAZE] * n, pa.string()),
            "qa_list": pa.array([[QA]] * n, pa.list_(pa.string())),
            "target_image": pa.array([[{"bytes": b, "path": None}] for b in targets], IMAGE_TYPE)}
    pq.write_table(pa.table(cols), path)
    return path


def _prepare(*argv):
    return subprocess.run([sys.executable, str(RL_DIR / "prepare_data.py"), *map(str, argv)], capture_output=True,
                          text=True, timeout=300, cwd=REPO)


def test_prepare_catches_truncated_images_by_file_and_row(tmp_path):
    good = encode(noise())
    src = tmp_path / "src"
    src.mkdir()
    # a: row 1's source is a truncated JPEG, row 2's is 16-bit; b: row 0's target is a truncated PNG
    a = _shard(src / "a.parquet", [good, truncated_jpeg(), grey16_png()], [good, good, exif6_png()])
    b = _shard(src / "b.parquet", [good, good], [truncated_png(), good])

    res = _prepare("--input", a, "--out", tmp_path / "o1")
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"{a} row 1 source_image: image could not be decoded" in res.stderr and "truncated" in res.stderr
    assert not (tmp_path / "o1" / "grpo.jsonl").exists() and not (tmp_path / "o1" / "parts" / "a.jsonl").exists()

    res = _prepare("--input", b, "--out", tmp_path / "o2", "--on_error", "raise")
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"{b} row 0 target_image: image could not be decoded" in res.stderr
    assert not (tmp_path / "o2" / "grpo.jsonl").exists()

    out = tmp_path / "o3"
    res = _prepare("--input", src / "*.parquet", "--out", out, "--on_error", "skip")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (summary["rows"], summary["skipped"]) == (3, 2)
    assert summary["skipped_rows"] == [{"file": str(a), "row": 1}, {"file": str(b), "row": 0}]
    listed = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(x["file"], x["row"]) for x in listed] == [(str(a), 1), (str(b), 0)]
    assert "source_image: image could not be decoded" in listed[0]["error"]
    assert "truncated" in listed[1]["error"].lower()
    prompts = read_jsonl(out / "grpo.jsonl")
    assert [p.id for p in prompts] == ["0", "2", "4"]  # global row indices: a row 1 and b row 0 (= 3) skipped

    # the trainer's loader applies the rule: the 16-bit source keeps its gradient
    spec = importlib.util.spec_from_file_location("etchr_rl_train_grpo_script", RL_DIR / "train_grpo.py")
    train_grpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_grpo)
    source = train_grpo._load_source(prompts[1])
    assert source.mode == "RGB" and len(np.unique(np.asarray(source))) >= 250
    assert open_rgb8(prompts[1].target_image).size == (2, 4)  # the EXIF-rotated target, as displayed
    (tmp_path / "t.jpg").write_bytes(truncated_jpeg())
    prompts[0].source_image = str(tmp_path / "t.jpg")
    with pytest.raises(ImageError, match=r"prompt 0 source_image .*t.jpg: image could not be decoded"):
        train_grpo._load_source(prompts[0])
