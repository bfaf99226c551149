"""The editor: a diffusers FLUX.2-klein pipeline dir (+ optional LoRA), output sizing, seeds, edit cache.

LoRA files (CHECKPOINTS.md section 2) are fused into the transformer weights at load time as
W + lora_scale * (alpha / rank) * B @ A, computed in fp32: exact, and no LoRA matmuls per step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from .config import ConfigError
from .runtime import atomic_write_bytes, get_logger, local_rank

log = get_logger("etchr_eval.editor")


# ----------------------------------------------------------------------------------------------
# Pure helpers (tested with hand-computed values)
# ----------------------------------------------------------------------------------------------
def output_size(width: int, height: int, *, max_area: int = 1024 * 1024, multiple_of: int = 16,
                mode: str = "keep_aspect") -> tuple[int, int]:
    """(W, H) of the edit for a W x H source.

    keep_aspect: scale down (never up) to area <= max_area, then floor both sides to multiples of
    `multiple_of`. reference_clamp: the reference's min(W, 1024), min(H, 1024), floored to multiples
    of `multiple_of` as the pipeline would (distorts the aspect ratio of large images).
    """
    if mode == "reference_clamp":
        side = int(math.isqrt(max_area))
        w, h = min(width, side), min(height, side)
    elif mode == "keep_aspect":
        scale = min(1.0, math.sqrt(max_area / float(width * height)))
        w, h = width * scale, height * scale
    else:
        raise ValueError(f"size mode {mode!r}: use keep_aspect or reference_clamp")
    w = max(multiple_of, int(w) // multiple_of * multiple_of)
    h = max(multiple_of, int(h) // multiple_of * multiple_of)
    return w, h


def item_seed(base_seed: int, task: str, item_id: str, per_item: bool = True) -> int:
    """A 31-bit seed from (base seed, task, item id): stable across runs, ranks and shardings."""
    if not per_item:
        return int(base_seed)
    digest = hashlib.sha256(f"{base_seed}:{task}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


_DIFFSYNTH = re.compile(r"\.lora_([AB])\.default\.weight$")


def normalise_lora_keys(state: dict) -> dict:
    """DiffSynth naming (`blocks.0.attn.to_q.lora_A.default.weight`) -> diffusers naming
    (`transformer.blocks.0.attn.to_q.lora_A.weight`); diffusers-named keys pass through."""
    out = {}
    for key, value in state.items():
        new = _DIFFSYNTH.sub(r".lora_\1.weight", key)
        if not new.startswith("transformer."):
            new = "transformer." + new
        out[new] = value
    return out


def read_lora(path: str | os.PathLike, alpha: Optional[float] = None) -> tuple[dict, float, int]:
    """Load a LoRA file -> (diffusers-named state dict, alpha, rank).

    Rank comes from the lora_A tensors (a header or meta.json rank that disagrees is an error). Alpha
    comes from the argument, else the safetensors metadata `lora_adapter_metadata`, else meta.json
    beside the file, and those two records must agree; a file with no recorded alpha is an error
    (CHECKPOINTS.md section 2).
    """
    from safetensors import safe_open

    path = resolve_lora_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    state = normalise_lora_keys(state)
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
    if len(ranks) != 1:
        raise ValueError(f"{path}: expected one LoRA rank, found {sorted(ranks) or 'no lora_A keys'}")
    rank = ranks.pop()
    header, meta_json = {}, path.parent / "meta.json"
    if "lora_adapter_metadata" in metadata:
        md = json.loads(metadata["lora_adapter_metadata"])  # diffusers prefixes keys with "transformer."
        header = {"alpha": md.get("lora_alpha", md.get("transformer.lora_alpha")),
                  "rank": md.get("r", md.get("transformer.r"))}
    recorded = (json.loads(meta_json.read_text()).get("lora") or {}) if meta_json.is_file() else {}
    where = {"header": f"{path} (header lora_adapter_metadata)", "meta": f"{meta_json} (lora)"}
    for name, rec in (("header", header), ("meta", recorded)):
        if rec.get("rank") is not None and int(rec["rank"]) != rank:  # alpha / wrong rank = wrong strength
            raise ValueError(f"LoRA rank mismatch: {where[name]} says rank {rec['rank']}, the lora_A tensors of "
                             f"{path} have rank {rank}")
    if header.get("alpha") is not None and recorded.get("alpha") is not None \
            and float(header["alpha"]) != float(recorded["alpha"]):
        raise ValueError(f"LoRA alpha mismatch: {where['header']} says alpha {float(header['alpha']):g}, "
                         f"{where['meta']} says alpha {float(recorded['alpha']):g}")
    if alpha is None:
        alpha = header.get("alpha") if header.get("alpha") is not None else recorded.get("alpha")
    if alpha is None:
        raise ValueError(f"{path}: LoRA alpha is not recorded (no lora_adapter_metadata in the file header, "
                         f"no lora.alpha in {meta_json}); pass editor.lora_alpha explicitly")
    return state, float(alpha), rank


def fuse_lora(transformer, state: dict, alpha: float, rank: int, scale: float = 1.0) -> int:
    """W += scale * alpha / rank * B @ A for every LoRA pair; returns the number of fused layers."""
    import torch

    modules = dict(transformer.named_modules())
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        m = re.fullmatch(r"transformer\.(.+)\.lora_([AB])\.weight", key)
        if not m:
            raise ValueError(f"unexpected LoRA key {key!r} (want transformer.<module>.lora_A/B.weight)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    factor = scale * alpha / rank
    with torch.no_grad():
        for name, ab in pairs.items():
            if name not in modules or not hasattr(modules[name], "weight"):
                raise ValueError(f"LoRA targets {name!r}, which is not a layer of this transformer")
            if set(ab) != {"A", "B"}:
                raise ValueError(f"LoRA layer {name!r} lacks lora_{'A' if 'A' not in ab else 'B'}")
            w = modules[name].weight
            delta = ab["B"].to(torch.float32) @ ab["A"].to(torch.float32)
            if delta.shape != w.shape:
                raise ValueError(f"LoRA {name}: B @ A is {tuple(delta.shape)}, weight is {tuple(w.shape)}")
            w.copy_((w.to(torch.float32) + factor * delta.to(w.device)).to(w.dtype))
    return len(pairs)


def resolve_lora_path(path: str | os.PathLike) -> Path:
    """A LoRA file, or a checkpoint dir holding `pytorch_lora_weights.safetensors` (CHECKPOINTS.md), as
    SFT/RL merge_lora.py accept."""
    path = Path(path)
    if path.is_dir():
        inside = path / "pytorch_lora_weights.safetensors"
        if not inside.is_file():
            raise FileNotFoundError(f"{path}: a folder without pytorch_lora_weights.safetensors; point "
                                    "editor.lora_path at a LoRA checkpoint dir or .safetensors file")
        return inside
    return path


def check_lora_fits(pipe_path: str | os.PathLike, lora_path: str | os.PathLike,
                    alpha: Optional[float] = None) -> int:
    """Check a LoRA file against the pipeline's transformer from the safetensors headers alone (no
    tensor is read, so a 4 GB r768 file costs nothing): every targeted layer exists, B @ A has the
    layer's shape, and the alpha is recorded. Raises ValueError naming the file and the first layer
    that does not fit; returns the number of layers."""
    from safetensors import safe_open

    lora_path = resolve_lora_path(lora_path)
    if not lora_path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {lora_path}")
    with safe_open(str(lora_path), framework="pt") as f:
        shapes = normalise_lora_keys({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    weights: dict[str, tuple] = {}
    tdir = Path(pipe_path) / "transformer"
    files = sorted(tdir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{tdir}: no .safetensors weights to check the LoRA against")
    for wf in files:
        with safe_open(str(wf), framework="pt") as f:
            weights.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    pairs: dict[str, dict[str, tuple]] = {}
    for key, shape in shapes.items():
        m = re.fullmatch(r"transformer\.(.+)\.lora_([AB])\.weight", key)
        if not m:
            raise ConfigError(f"{lora_path}: unexpected LoRA key {key!r} (want transformer.<module>.lora_A/B.weight)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = shape
    for name, ab in sorted(pairs.items()):
        w = weights.get(f"{name}.weight")
        if w is None:
            raise ConfigError(f"{lora_path}: LoRA targets {name!r}, which is not a layer of the transformer in "
                             f"{tdir} (wrong base model?)")
        if set(ab) != {"A", "B"}:
            raise ConfigError(f"{lora_path}: LoRA layer {name!r} lacks lora_{'A' if 'A' not in ab else 'B'}")
        if len(ab["A"]) != 2 or len(ab["B"]) != 2 or ab["A"][0] != ab["B"][1] or (ab["B"][0], ab["A"][1]) != tuple(w):
            raise ConfigError(f"{lora_path}: LoRA {name}: B {ab['B']} @ A {ab['A']} does not fit the weight {tuple(w)} "
                             f"of {tdir} (a LoRA trained on another model shape?)")
    if not pairs:
        raise ConfigError(f"{lora_path}: no LoRA layers in the file")
    read_alpha = alpha
    if read_alpha is None:
        with safe_open(str(lora_path), framework="pt") as f:
            md = f.metadata() or {}
        meta_json = lora_path.parent / "meta.json"
        if "lora_adapter_metadata" not in md and not meta_json.is_file():
            raise ConfigError(f"{lora_path}: LoRA alpha is not recorded (no lora_adapter_metadata in the file header, "
                             f"no {meta_json}); pass editor.lora_alpha explicitly")
    return len(pairs)


def checkpoint_fingerprint(pipe_path: str | os.PathLike, lora_path: Optional[str] = None,
                           lora_scale: float = 1.0, lora_alpha: Optional[float] = None) -> str:
    """A short hash naming the editor's weights, for the edit cache.

    Configs and meta.json are hashed whole; each weight file by name, size and its first and last
    MiB (hashing 18 GB at every start would cost minutes); a LoRA file whole.
    """
    h = hashlib.sha256()
    root = Path(pipe_path)
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"{root}: not a diffusers pipeline dir (model_index.json missing)")
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = str(p.relative_to(root))
        h.update(rel.encode())
        if p.suffix in (".json", ".jinja", ".txt"):
            h.update(p.read_bytes())
        else:
            size = p.stat().st_size
            h.update(str(size).encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
                if size > 2 << 20:
                    f.seek(-(1 << 20), os.SEEK_END)
                    h.update(f.read())
    if lora_path:
        with open(resolve_lora_path(lora_path), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        h.update(f"scale={lora_scale},alpha={lora_alpha}".encode())
    return h.hexdigest()[:20]


def image_digest(image: Image.Image) -> str:
    h = hashlib.sha256()
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()[:20]


# ----------------------------------------------------------------------------------------------
# Edit cache: edits keyed by (checkpoint fingerprint, source image, prompt, seed, steps, guidance, size)
# ----------------------------------------------------------------------------------------------
class EditCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)  # created by the first put(): a run stopped at start leaves nothing behind

    @staticmethod
    def key(**fields: Any) -> str:
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.png"

    def get(self, key: str) -> Optional[Image.Image]:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            with Image.open(p) as im:
                return im.convert("RGB")
        except OSError:  # a damaged file (disk trouble): recompute it
            return None

    def put(self, key: str, image: Image.Image, fields: dict) -> Path:
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG")
        p = self.path(key)
        atomic_write_bytes(p, buf.getvalue())
        atomic_write_bytes(p.with_suffix(".json"), json.dumps(fields, sort_keys=True).encode())
        return p


# ----------------------------------------------------------------------------------------------
# Speed options: each can change outputs, so each is part of the edit-cache key when on
# ----------------------------------------------------------------------------------------------
def speed_fields(cfg) -> dict:
    out = {}
    if getattr(cfg, "step_cache", "none") != "none":
        out.update(step_cache=cfg.step_cache, step_cache_interval=cfg.step_cache_interval,
                   step_cache_warmup=cfg.step_cache_warmup)
    if getattr(cfg, "compile", False):
        out["compile"] = True  # compiled kernels may round differently from eager ones
    if getattr(cfg, "cfg_batch", False):
        out["cfg_batch"] = True  # batch-2 matmuls may pick other kernels than batch-1 ones
    if getattr(cfg, "attention_backend", "native") != "native":
        out["attention_backend"] = cfg.attention_backend
    if getattr(cfg, "quantize", "none") != "none":
        out["quantize"] = cfg.quantize
    return out


def fp8_targets(transformer) -> list[str]:
    """The Linear layers of the repeated blocks whose matmuls go to fp8: every one in the double- and
    single-stream blocks with both sides a multiple of 16 (the fp8 matmul's alignment). Embedders,
    modulation and the output projection stay in bf16 (small, and the most sensitive)."""
    import torch

    names = []
    for name, module in transformer.named_modules():
        if (isinstance(module, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer_blocks."))
                and module.in_features % 16 == 0 and module.out_features % 16 == 0):
            names.append(name)
    return names


def check_fp8(device: str, preset: Optional[str] = None) -> None:
    """Refuse editor.quantize=fp8 (alone or through a preset) where it cannot run: no torchao, no CUDA device,
    or a GPU without fp8 matmuls (compute capability < 8.9). Raises RuntimeError saying what is missing."""
    import torch

    via = f" (editor.preset={preset} includes it; preset=fast_bf16 needs no fp8)" if preset else ""
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"editor.quantize=fp8 needs torchao{via} (pip install 'torchao>=0.17', which must match the "
                           f"installed torch): {exc}") from None
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        raise RuntimeError(f"editor.quantize=fp8 needs a CUDA GPU with fp8 matmuls{via}; the editor runs on "
                           f"{device!r} (torch.cuda.is_available() = {torch.cuda.is_available()})")
    cap = torch.cuda.get_device_capability(torch.device(device))
    if cap < (8, 9):
        raise RuntimeError(f"editor.quantize=fp8 needs compute capability >= 8.9 (Ada, Hopper or newer){via}; "
                           f"{torch.cuda.get_device_name(torch.device(device))} has {cap[0]}.{cap[1]}")


def quantize_fp8(transformer) -> int:
    """Float8 (e4m3) weights with per-row scales and dynamically quantised activations, through
    torchao; returns the number of converted layers. (Quantising is a per-row absmax and a cast of the
    weights already on the GPU; bench_edit reports its seconds apart from the compile warm-up.)"""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        raise RuntimeError("editor.quantize=fp8 needs torchao (pip install 'torchao>=0.17', which must match the "
                           f"installed torch): {exc}") from None
    names = set(fp8_targets(transformer))
    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda module, fqn: fqn in names)
    return len(names)


class CFGBatch:
    """Runs both CFG branches of Flux2KleinPipeline as one batch-2 forward.

    Installed as the transformer's forward. While armed with the negative prompt's (embeds, text ids),
    the pipeline's conditional call runs [cond | uncond] in one batch and returns the first half; its
    unconditional call, which passes the same latent tensor object, gets the kept second half without
    a forward. The uncond branch sees exactly the inputs the pipeline would give it (the negative
    prompt is encoded by the pipeline's own encode_prompt and handed to it as negative_prompt_embeds).
    """

    def __init__(self, transformer):
        self.forward = transformer.forward  # the bound original
        self.negative = None  # (embeds, text ids) while an edit runs
        self.pending = None  # (latents object, uncond output) between the two calls of a step

    def __call__(self, hidden_states, timestep, encoder_hidden_states=None, txt_ids=None, img_ids=None, **kwargs):
        import torch

        if self.pending is not None and hidden_states is self.pending[0]:
            out, self.pending = self.pending[1], None
            return _as_output(out) if kwargs.get("return_dict", True) else (out,)
        if self.negative is None:
            return self.forward(hidden_states=hidden_states, timestep=timestep,
                                encoder_hidden_states=encoder_hidden_states, txt_ids=txt_ids, img_ids=img_ids, **kwargs)
        neg_embeds, neg_ids = self.negative
        b = hidden_states.shape[0]
        if neg_embeds.shape[0] != b or neg_embeds.shape[1:] != encoder_hidden_states.shape[1:]:
            raise ValueError(f"cfg_batch: negative prompt embeds {tuple(neg_embeds.shape)} do not match the prompt's "
                             f"{tuple(encoder_hidden_states.shape)}")
        both = self.forward(hidden_states=torch.cat([hidden_states, hidden_states]),
                            timestep=torch.cat([timestep, timestep]),
                            encoder_hidden_states=torch.cat([encoder_hidden_states, neg_embeds.to(encoder_hidden_states.dtype)]),
                            txt_ids=torch.cat([txt_ids, neg_ids]), img_ids=torch.cat([img_ids, img_ids]),
                            **{**kwargs, "return_dict": False})[0]
        self.pending = (hidden_states, both[b:])
        return _as_output(both[:b]) if kwargs.get("return_dict", True) else (both[:b],)


def _as_output(sample):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)


DEFAULT_COMPILE_CACHE = "~/.cache/etchr/inductor"


def configure_compile_cache(cache_dir: Optional[str] = None) -> str:
    """Point torch.compile's on-disk caches at `cache_dir` before anything compiles, so a second start of the
    same editor (same weights' shapes, torch, GPU) loads the compiled kernels instead of generating them:
    inductor's FX-graph cache, the AOTAutograd cache and the Triton kernels (kept under the same folder).
    None = $TORCHINDUCTOR_CACHE_DIR if set, else ~/.cache/etchr/inductor. Returns the folder used.
    The folder may sit on shared storage next to the checkpoint: its entries are keyed by graph, torch
    version and device, so other cards or versions miss instead of loading wrong kernels."""
    import torch

    path = os.path.expanduser(cache_dir or os.environ.get("TORCHINDUCTOR_CACHE_DIR") or DEFAULT_COMPILE_CACHE)
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path  # inductor and its Triton cache read it at each use
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return path


def compile_counters() -> dict:
    """torch._dynamo's counters that tell a warm start from a cold one: graphs compiled, graph breaks,
    FX-graph and AOTAutograd cache hits and misses (zeros where torch has not counted yet)."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "frames": int(counters["frames"].get("total", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "fxgraph_cache_hit": int(counters["inductor"].get("fxgraph_cache_hit", 0)),
            "fxgraph_cache_miss": int(counters["inductor"].get("fxgraph_cache_miss", 0)),
            "autograd_cache_hit": int(counters["aot_autograd"].get("autograd_cache_hit", 0)),
            "autograd_cache_miss": int(counters["aot_autograd"].get("autograd_cache_miss", 0))}


def compile_transformer(transformer, step_cache: str = "none") -> None:
    """Regional torch.compile of the repeated blocks with static shapes (dynamic=False: the CFG batch, the
    token counts and the TaylorSeer branches each get exact kernels, and an edit size compiles once).
    The TaylorSeer hooks break each hooked block's graph at their compiler.disable'd bookkeeping; the
    resumed frames then differ per attention class and per compute / predict step (7 entries on one code
    object on the CPU-compiled tiny model over 40 steps, close to dynamo's default limit of 8, past which it
    falls back to eager silently), so the limit is raised to 32 with a step cache."""
    import torch

    if step_cache != "none":
        torch._dynamo.config.recompile_limit = max(int(torch._dynamo.config.recompile_limit), 32)
    transformer.compile_repeated_blocks(fullgraph=step_cache == "none", dynamic=False)


def apply_speed_options(pipe, cfg) -> None:
    """In order: fp8 matmuls (torchao), the attention kernel, TaylorSeer step caching (per CFG branch:
    the pipeline runs them in separate cache contexts; with batched CFG the "cond" context holds both
    rows and its extrapolation is row-wise, so the result is the same), batched CFG, and regional
    torch.compile of the transformer's repeated blocks with a persistent kernel cache. (diffusers 0.42.1's First Block Cache does not handle Flux2's
    block outputs.)"""
    if getattr(cfg, "quantize", "none") == "fp8":
        n = quantize_fp8(pipe.transformer)
        log.info("fp8 matmuls in %d Linear layers (torchao, per-row scales)", n)
    if getattr(cfg, "attention_backend", "native") != "native":
        pipe.transformer.set_attention_backend(cfg.attention_backend)
    if getattr(cfg, "step_cache", "none") == "taylorseer":
        from diffusers.hooks import TaylorSeerCacheConfig

        pipe.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=int(cfg.step_cache_interval),
                                                            disable_cache_before_step=int(cfg.step_cache_warmup)))
    if getattr(cfg, "cfg_batch", False) and not isinstance(pipe.transformer.forward, CFGBatch):
        pipe.transformer.forward = CFGBatch(pipe.transformer)
    if getattr(cfg, "compile", False):
        configure_compile_cache(getattr(cfg, "compile_cache_dir", None))
        compile_transformer(pipe.transformer, getattr(cfg, "step_cache", "none"))


def negative_prompt(pipe, device, max_sequence_length: int):
    """The pipeline's own encoding of its negative prompt "" (what CFG's uncond branch sees)."""
    import torch

    with torch.inference_mode():
        return pipe.encode_prompt(prompt=[""], device=device, max_sequence_length=max_sequence_length)


# ----------------------------------------------------------------------------------------------
# The editor
# ----------------------------------------------------------------------------------------------
class Editor:
    """Loads the pipeline once; `edit()` returns (image, cache path, seconds spent, cache hit)."""

    def __init__(self, cfg, cache_dir: str | os.PathLike):
        import torch
        from diffusers import Flux2KleinPipeline

        self.cfg = cfg
        if cfg.device == "auto":
            self.device = f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"
        else:
            self.device = cfg.device
        self.dtype_name = cfg.dtype if cfg.dtype != "auto" else ("bf16" if self.device.startswith("cuda") else "fp32")
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype_name]
        self.device_type = torch.device(self.device).type  # cuda / cpu / mps: kernels differ, so edits do
        self.cache = EditCache(cache_dir)
        self.fingerprint = checkpoint_fingerprint(cfg.pipe_path, cfg.lora_path, cfg.lora_scale,
                                                  getattr(cfg, "lora_alpha", None))
        if cfg.lora_path:  # a LoRA that does not fit stops the run here, once, not at every item
            check_lora_fits(cfg.pipe_path, cfg.lora_path, getattr(cfg, "lora_alpha", None))
        if getattr(cfg, "quantize", "none") == "fp8":  # before any write, not at the first edit
            check_fp8(self.device, getattr(cfg, "preset", None))
        self._pipe = None
        self._load_error: Optional[BaseException] = None
        self._negative = None  # the negative prompt's (embeds, text ids), for cfg_batch
        self._load = lambda: Flux2KleinPipeline.from_pretrained(cfg.pipe_path, dtype=self.dtype)
        self.stats = {"edits": 0, "cache_hits": 0, "edit_seconds": 0.0}

    @property
    def pipe(self):
        """Loaded on first use: a rerun whose edits are all cached never loads the model."""
        if self._load_error is not None:  # failed once: never reload the pipeline for every item
            raise RuntimeError(f"the editor failed to load: {self._load_error}") from self._load_error
        if self._pipe is None:
            try:
                self._pipe = self._load_pipe()
            except Exception as exc:
                self._load_error = exc
                raise
        return self._pipe

    def _load_pipe(self):
        t0 = time.time()
        pipe = self._load()
        if self.cfg.lora_path:
            state, alpha, rank = read_lora(self.cfg.lora_path, getattr(self.cfg, "lora_alpha", None))
            n = fuse_lora(pipe.transformer, state, alpha, rank, self.cfg.lora_scale)
            log.info("fused LoRA %s into %d layers (alpha %g, rank %d, scale %g)", self.cfg.lora_path, n,
                     alpha, rank, self.cfg.lora_scale)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        apply_speed_options(pipe, self.cfg)
        log.info("editor %s loaded on %s (%s) in %.1f s", self.cfg.pipe_path, self.device, self.dtype,
                 time.time() - t0)
        return pipe

    def fingerprint_fields(self) -> dict:
        """Every editor setting that changes an edit (the run fingerprint's editor part)."""
        c = self.cfg
        return {"checkpoint": self.fingerprint, "lora_scale": c.lora_scale, "steps": c.steps, "guidance": c.guidance, "seed": c.seed,
                "per_item_seed": c.per_item_seed, "size_mode": c.size_mode, "max_area": c.max_area,
                "multiple_of": c.multiple_of, "max_sequence_length": c.max_sequence_length,
                "dtype": self.dtype_name, "device_type": self.device_type, **speed_fields(c),
                **({"preset": c.preset} if getattr(c, "preset", None) else {})}

    def cache_fields(self, image: Image.Image, prompt: str, seed: int) -> dict:
        w, h = output_size(*image.size, max_area=self.cfg.max_area, multiple_of=self.cfg.multiple_of,
                           mode=self.cfg.size_mode)
        return {"checkpoint": self.fingerprint, "image": image_digest(image), "prompt": prompt, "seed": seed,
                "steps": self.cfg.steps, "guidance": self.cfg.guidance, "width": w, "height": h,
                "max_sequence_length": self.cfg.max_sequence_length, "dtype": self.dtype_name,
                "device_type": self.device_type, **speed_fields(self.cfg)}

    def edit(self, image: Image.Image, prompt: str, seed: int) -> tuple[Image.Image, Path, float, bool]:
        import torch

        fields = self.cache_fields(image, prompt, seed)
        key = EditCache.key(**fields)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats["cache_hits"] += 1
            return cached, self.cache.path(key), 0.0, True
        t0 = time.time()
        generator = torch.Generator(device=self.device).manual_seed(seed)
        pipe = self.pipe
        batcher = pipe.transformer.forward if isinstance(pipe.transformer.forward, CFGBatch) else None
        extra = {}
        if batcher is not None and self.cfg.guidance > 1:
            if self._negative is None:
                self._negative = negative_prompt(pipe, self.device, self.cfg.max_sequence_length)
            batcher.negative = self._negative
            extra["negative_prompt_embeds"] = self._negative[0]
        try:
            with torch.inference_mode():
                out = pipe(image=image, prompt=prompt, height=fields["height"], width=fields["width"],
                           num_inference_steps=self.cfg.steps, guidance_scale=self.cfg.guidance,
                           generator=generator, max_sequence_length=self.cfg.max_sequence_length, **extra).images[0]
        finally:
            if batcher is not None:
                batcher.negative = batcher.pending = None
        seconds = time.time() - t0
        path = self.cache.put(key, out, fields)
        self.stats["edits"] += 1
        self.stats["edit_seconds"] += seconds
        return out, path, seconds, False
