"""Precomputed conditioning (issue #17): text embeddings and target / reference latents on disk.

SFT/precompute.py encodes every row of the training CSV once, in batches (text encoder on batches of
prompts, VAE on batches of one size), into safetensors shards under data.precomputed_dir; the trainer
then reads them and never runs the two frozen encoders for its steps. Pickle-free: safetensors + JSON.

Layout of data.precomputed_dir:
  shards/shard-<n>-<hash>.safetensors   tensors "<row key>.prompt_embeds|text_ids|target|reference"
  index.json                            {"entries": {row key: shard file}, "files": {image path: [size,
                                        mtime_ns, sha256]}, "settings": [every settings set stored]}
  meta.json                             what and how: model fingerprint, settings, counts, seconds, samples/s

The row key is a hash of everything the stored tensors depend on: the bytes of both images (sha256),
the prompt, the sizing settings (max_pixels, multiple_of, reference_resize), max_sequence_length, the
weights dtype and the encoders' fingerprint. A changed setting gives other keys, so nothing stale is
ever read; the trainer names the setting that differs. The shard plan is a pure function of the rows
and settings (rows ordered by size bucket, then index; cut into batches, batches into shards; shard
n goes to rank n % world), so a resumed or differently-sharded run writes the same files; a shard
file appears by atomic rename only once complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from .data import BatchDataset, DataError, Row, bucket_key

SCHEMA = 1
FIELDS = ("prompt_embeds", "text_ids", "target", "reference")
SETTING_KEYS = ("max_pixels", "multiple_of", "reference_resize", "max_sequence_length", "dtype", "model")
EXIT_AFTER_ENV = "ETCHR_PRECOMPUTE_EXIT_AFTER"  # fault injection (tests): hard exit after N encoded batches


# ----------------------------------------------------------------------------------------------
# Identity: model fingerprint, settings, image hashes, row keys
# ----------------------------------------------------------------------------------------------
def _module_fingerprint(module, samples: int = 4096) -> str:
    """sha256 over the config and every parameter / buffer's name, shape, dtype and the exact bytes of
    up to `samples` evenly strided elements. Exact and device-independent (no reductions); a
    fine-tuned or different checkpoint changes nearly every element, so the sample sees it."""
    h = hashlib.sha256()
    cfg = getattr(module, "config", None)
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        part = flat[::step][:samples].cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(part.view(torch.uint8).numpy().tobytes() if part.numel() else b"")
    return h.hexdigest()[:24]


def model_fingerprint(pipe) -> dict:
    """Fingerprints of the frozen encoders whose outputs are stored: VAE, text encoder, tokenizer."""
    tok = pipe.tokenizer
    vocab = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode())
    vocab.update(str(getattr(tok, "chat_template", "")).encode())
    return {"vae": _module_fingerprint(pipe.vae), "text_encoder": _module_fingerprint(pipe.text_encoder),
            "tokenizer": vocab.hexdigest()[:24]}


def settings_of(cfg, fingerprint: dict) -> dict:
    """Every setting the stored tensors depend on (the training config's data./model. keys)."""
    return {"max_pixels": int(cfg.data.max_pixels), "multiple_of": int(cfg.data.multiple_of),
            "reference_resize": str(cfg.data.reference_resize),
            "max_sequence_length": int(cfg.model.max_sequence_length), "dtype": str(cfg.model.dtype),
            "model": dict(fingerprint)}


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class FileHashes:
    """sha256 of image files, trusting a recorded hash while (size, mtime_ns) are unchanged."""

    def __init__(self, known: dict | None = None):
        self.known = dict(known or {})

    def __call__(self, path: str) -> str:
        st = os.stat(path)
        rec = self.known.get(path)
        if rec and rec[0] == st.st_size and rec[1] == st.st_mtime_ns:
            return rec[2]
        digest = file_sha256(path)
        self.known[path] = [st.st_size, st.st_mtime_ns, digest]
        return digest


def row_key(row: Row, settings: dict, hashes: FileHashes) -> str:
    """The content key of one row's stored tensors (see the module docstring)."""
    parts = {"target": hashes(row.target), "reference": hashes(row.reference), "prompt": row.prompt,
             "target_size": list(row.size), "reference_size": list(row.ref_size),
             **{k: settings[k] for k in SETTING_KEYS}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------
# The plan: batches of one size bucket, shards of batches, dealt to ranks by shard number
# ----------------------------------------------------------------------------------------------
def plan(rows: list[Row], keys: list[str], cfg, batch_size: int, shard_batches: int) -> list[dict]:
    """[{"name", "batches": [[row index, ...], ...], "keys": [...]}] covering each distinct key once."""
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    unique = sorted(first.values(), key=lambda i: (bucket_key(rows[i], cfg.data.max_pixels, cfg.data.multiple_of,
                                                              cfg.data.reference_resize), i))
    groups: dict = {}
    for i in unique:
        groups.setdefault(bucket_key(rows[i], cfg.data.max_pixels, cfg.data.multiple_of,
                                     cfg.data.reference_resize), []).append(i)
    batches = [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]
    shards = []
    for n, s in enumerate(range(0, len(batches), shard_batches)):
        chunk = batches[s:s + shard_batches]
        ks = [keys[i] for b in chunk for i in b]
        digest = hashlib.sha256("\n".join(ks).encode()).hexdigest()[:12]
        shards.append({"name": f"shard-{n:06d}-{digest}.safetensors", "batches": chunk, "keys": ks})
    return shards


@torch.no_grad()
def encode_batch(pipe, batch: dict, device, max_sequence_length: int) -> dict:
    """One preprocessed batch (BatchDataset item) -> the four tensors per sample, on the CPU."""
    from .model import encode_images, encode_prompts

    embeds, ids = encode_prompts(pipe, batch["prompt"], device, max_sequence_length)
    tgt, ref = encode_images(pipe, batch["target"]), encode_images(pipe, batch["reference"])
    return {"prompt_embeds": embeds.cpu(), "text_ids": ids.cpu(), "target": tgt.cpu(), "reference": ref.cpu()}


def precompute_cost(pipe, rows: list[Row], batch_size: int, *, max_pixels: int = 1048576, multiple_of: int = 16,
                    reference_resize: str = "pipeline", max_sequence_length: int = 512, warmup: int = 1) -> dict:
    """Seconds per sample of the batched precompute of `rows` (etchr_sft.data.Row, e.g. from read_csv):
    image decode + preprocessing, text encoder on batches of `batch_size` prompts, VAE on same-size
    batches; after `warmup` untimed batches. CUDA-synchronised. For scripts/bench/."""
    device = pipe.vae.device
    keys = [bucket_key(r, max_pixels, multiple_of, reference_resize) for r in rows]
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    batches = [g[s:s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]
    ds = BatchDataset(rows, batches, max_pixels=max_pixels, multiple_of=multiple_of, reference_resize=reference_resize)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timed = {"load_s": 0.0, "text_s": 0.0, "vae_s": 0.0}
    n = 0
    from .model import encode_images, encode_prompts

    for k in range(len(ds)):
        sync()
        t0 = time.perf_counter()
        batch = ds[k]
        t1 = time.perf_counter()
        encode_prompts(pipe, batch["prompt"], device, max_sequence_length)
        sync()
        t2 = time.perf_counter()
        encode_images(pipe, batch["target"])
        encode_images(pipe, batch["reference"])
        sync()
        t3 = time.perf_counter()
        if k >= warmup:
            timed["load_s"] += t1 - t0
            timed["text_s"] += t2 - t1
            timed["vae_s"] += t3 - t2
            n += len(batch["prompt"])
    if n == 0:
        raise ValueError(f"precompute_cost: {len(rows)} rows give no timed batch after {warmup} warmup batch(es)")
    total = sum(timed.values())
    return {"batch_size": batch_size, "samples": n, "seconds_per_sample": total / n,
            **{k.replace("_s", "_s_per_sample"): v / n for k, v in timed.items()}}


# ----------------------------------------------------------------------------------------------
# Writing (SFT/precompute.py)
# ----------------------------------------------------------------------------------------------
def _read_json(path: Path, default):
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); delete it and re-run SFT/precompute.py") from None


def write_shard(path: Path, tensors: dict, settings: dict) -> None:
    """All or nothing: a temp file in the same folder, then rename."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # one metadata key: safetensors writes several in hash-map order, which would make equal shards differ in bytes
    save_file(tensors, str(tmp), metadata={"etchr_precompute": json.dumps({"schema": SCHEMA, "settings": settings},
                                                                          sort_keys=True)})
    os.replace(tmp, path)


def write_index(root: Path, shards: list[dict], hashes: FileHashes, settings: dict, stats: dict) -> dict:
    """Merge this run's entries into index.json (earlier settings' entries stay) and write meta.json."""
    from .runtime import atomic_write_json

    index = _read_json(root / "index.json", {"schema": SCHEMA, "entries": {}, "files": {}, "settings": []})
    for s in shards:
        if not (root / "shards" / s["name"]).is_file():
            raise DataError(f"{root / 'shards' / s['name']}: shard missing after the run; re-run SFT/precompute.py")
        for k in s["keys"]:
            index["entries"][k] = s["name"]
    index["files"].update(hashes.known)
    if settings not in index["settings"]:
        index["settings"].append(settings)
    atomic_write_json(root / "index.json", index)
    meta = {"schema": SCHEMA, "what": "SFT precomputed conditioning: text embeddings (prompt_embeds, text_ids), "
                                     "target latents, reference latents (normalised, patchified VAE latents)",
            "settings": settings, "entries_total": len(index["entries"]), "shards_total": len(shards), **stats}
    atomic_write_json(root / "meta.json", meta)
    return meta


# ----------------------------------------------------------------------------------------------
# Reading (train_sft.py)
# ----------------------------------------------------------------------------------------------
def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: stored {b.get(k)!r}, this run {a.get(k)!r}")
    return out


class PrecomputedStore:
    """data.precomputed_dir opened for training: each row's key checked before step 0."""

    def __init__(self, root: str, rows: list[Row], cfg, fingerprint: dict):
        self.root = Path(root)
        index = _read_json(self.root / "index.json", None)
        if index is None:
            raise DataError(f"data.precomputed_dir={root}: no index.json (precompute not run or not finished); run "
                            f"python SFT/precompute.py --config <this config> to completion first")
        self.settings = settings_of(cfg, fingerprint)
        hashes = FileHashes(index.get("files"))
        self.keys = [row_key(r, self.settings, hashes) for r in rows]
        entries = index["entries"]
        missing = [i for i, k in enumerate(self.keys) if k not in entries]
        if missing:
            i = missing[0]
            if self.settings in index["settings"]:
                why = "its images or prompt changed since the precompute (or the run did not cover it)"
            else:
                diffs = [d for s in index["settings"][-1:] for d in _differences(self.settings, s)]
                why = "the settings differ: " + "; ".join(diffs)
            raise DataError(f"data.precomputed_dir={root}: row {i} ({rows[i].target}) and {len(missing) - 1} more "
                            f"rows not precomputed: {why}. Re-run SFT/precompute.py with this config")
        self.shard_of = [entries[k] for k in self.keys]
        for name in sorted(set(self.shard_of)):
            if not (self.root / "shards" / name).is_file():
                raise DataError(f"data.precomputed_dir={root}: shard file shards/{name} (listed in index.json) is "
                                f"missing; re-run SFT/precompute.py")

    def load(self, indices: list[int]) -> dict:
        """The stored tensors of rows `indices`, stacked: prompt_embeds (B, L, D), text_ids (B, L, 4),
        target (B, C, h, w), reference (B, C, h', w')."""
        from safetensors import safe_open

        out = {f: [] for f in FIELDS}
        by_shard: dict = {}
        for j, i in enumerate(indices):
            by_shard.setdefault(self.shard_of[i], []).append((j, i))
        got: dict = {}
        for name, members in by_shard.items():
            path = self.root / "shards" / name
            try:
                with safe_open(str(path), "pt") as f:
                    for j, i in members:
                        got[j] = {fld: f.get_tensor(f"{self.keys[i]}.{fld}") for fld in FIELDS}
            except Exception as exc:  # a truncated or replaced file
                raise DataError(f"{path}: cannot read row {members[0][1]} ({exc}); re-run SFT/precompute.py") from None
        for j in range(len(indices)):
            for fld in FIELDS:
                out[fld].append(got[j][fld])
        return {f: torch.stack(v) for f, v in out.items()}


class PrecomputedDataset(torch.utils.data.Dataset):
    """The trainer's loader items without images: batch k's stored tensors, read in dataloader workers."""

    def __init__(self, store: PrecomputedStore, batches: list[list[int]]):
        self.store, self.batches = store, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict:
        return {**self.store.load(self.batches[k]), "index": torch.tensor(self.batches[k])}
