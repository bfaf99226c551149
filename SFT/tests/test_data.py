"""SFT data: sizing rules, buckets, rank-independent batches, CSV errors."""

import pytest

from etchr_sft.data import DataError, make_batches, read_csv, reference_size, shard, target_size


@pytest.mark.parametrize("w,h,maxpx,expected", [
    (1024, 1024, 1048576, (1024, 1024)),
    (2000, 1000, 1048576, (1440, 720)),  # scale sqrt(1048576/2e6) = 0.7241: (1448.2, 724.1) -> /16
    (500, 333, 1048576, (496, 320)),  # never upscaled, floored to /16
    (96, 64, 6144, (96, 64)),
    (128, 128, 8192, (80, 80)),  # scale 0.7071: 90.5 -> 80
])
def test_target_size(w, h, maxpx, expected):
    assert target_size(w, h, maxpx) == expected


def test_target_too_small():
    with pytest.raises(DataError, match="too small"):
        target_size(20, 20, 100)


@pytest.mark.parametrize("w,h,mode,expected", [
    (500, 333, "pipeline", (496, 320)),  # under 1 MP: floored only
    (2048, 1024, "pipeline", (1440, 720)),  # area-capped (int(1448.15), int(724.07)) then floored
    (500, 333, "diffsynth", (1248, 832)),  # ~1 MP, rounded to 32: upscaled
    (2048, 1024, "diffsynth", (1440, 736)),
])
def test_reference_size(w, h, mode, expected):
    assert reference_size(w, h, mode) == expected


def test_batches_cover_every_sample_once_and_stay_in_one_bucket():
    keys = [("a" if i % 3 else "b") for i in range(23)]
    batches = make_batches(keys, 4, seed=1, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(23))
    assert all(len({keys[i] for i in b}) == 1 and 1 <= len(b) <= 4 for b in batches)
    assert batches == make_batches(keys, 4, seed=1, epoch=0)
    assert batches != make_batches(keys, 4, seed=1, epoch=1)


def test_shard_round_robin_equal_counts():
    batches = [[i] for i in range(7)]
    assert shard(batches, 0, 2) == [[0], [2], [4]] and shard(batches, 1, 2) == [[1], [3], [5]]
    with pytest.raises(DataError, match="cannot feed 8 processes"):
        shard(batches, 0, 8)


def test_batch_size_needs_buckets():
    with pytest.raises(ValueError, match="aspect-ratio buckets"):
        make_batches(["a"] * 4, 2, 0, 0, buckets=False)


def test_csv_errors(tmp_path, sft_csv):
    rows = read_csv(str(sft_csv))
    assert len(rows) == 8 and rows[0].size == (96, 64) and rows[1].size == (64, 96)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,prompt\na.png,hi\n")
    with pytest.raises(DataError, match=r"bad\.csv: missing column\(s\) edit_image"):
        read_csv(str(bad))
    bad.write_text("image,edit_image,prompt\na.png,b.png,\n")
    with pytest.raises(DataError, match="row 0: empty prompt"):
        read_csv(str(bad))
