"""The FLUX.2-klein parts SFT trains and feeds: loading, LoRA targets, encoders, the DiT forward.

The sequence fed to the DiT is [text 512 | noisy target tokens | clean reference tokens] with RoPE
ids text (0,0,0,l), target (0,h,w,0), reference (10,h,w,0) (PROTOCOL.md section 0); built with the
pipeline's own helpers so training sees exactly what inference sees.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Optional

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def load_pipeline(path: str, dtype: torch.dtype):
    """The full pipeline (frozen VAE and text encoder, the transformer to train)."""
    from diffusers import Flux2KleinPipeline

    if not Path(path, "model_index.json").is_file():
        raise FileNotFoundError(f"{path}: not a diffusers FLUX.2-klein pipeline dir (model_index.json missing)")
    pipe = Flux2KleinPipeline.from_pretrained(path, dtype=dtype)
    for frozen in (pipe.vae, pipe.text_encoder):
        frozen.requires_grad_(False)
        frozen.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_target_names(transformer, suffixes: list[str], single_blocks_to_out: bool) -> list[str]:
    """Full module names of the Linear layers LoRA wraps: names ending in one of `suffixes` (on a dot
    boundary), plus `single_transformer_blocks.<i>.attn.to_out` when asked (the reference's 144 layers
    on the 9B; a bare `to_out` would also match the double blocks' ModuleList and break peft)."""
    names = []
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if any(name == s or name.endswith("." + s) for s in suffixes):
            names.append(name)
        elif single_blocks_to_out and name.startswith("single_transformer_blocks.") and name.endswith(".attn.to_out"):
            names.append(name)
    if not names:
        raise ValueError(f"no Linear layer matches the LoRA targets {suffixes}")
    return names


def add_lora(transformer, rank: int, alpha: float, targets: list[str], dropout: float = 0.0):
    from peft import LoraConfig

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                     init_lora_weights="gaussian")
    transformer.add_adapter(cfg)
    return cfg


def apply_speed_options(transformer, model_cfg) -> list[str]:
    """The speed switches of `model:` (docs/PERFORMANCE.md): an attention kernel and torch.compile of the
    blocks. Call after LoRA and the checkpointing plan are in place (the compiled blocks include their LoRA
    layers). Returns what was applied, for the log.

    model.compile compiles each block that is not checkpointed; the checkpointed ones run eagerly, and on
    CUDA SDPA's cuDNN kernel is turned off for the process. Measured on an H200 (torch 2.11, 9B width,
    r768, 1024^2; docs/PERFORMANCE.md "Compiled backward"): a compiled block under the checkpoint wrapper
    gets wrong LoRA gradients (2e7 x eager's largest, with or without graph breaks), and cuDNN attention's
    compiled backward crashes, while compiled plain blocks with cuDNN off match eager (0.6% of the largest
    gradient, bf16). model.compile_trust_backward=true compiles the checkpointed blocks too."""
    applied = []
    if model_cfg.attention_backend != "native":
        transformer.set_attention_backend(model_cfg.attention_backend)
        applied.append(f"attention={model_cfg.attention_backend}")
    if model_cfg.compile:
        done, total = compile_blocks(transformer, fullgraph=model_cfg.compile_fullgraph,
                                     checkpointed_too=model_cfg.compile_trust_backward)
        if next(transformer.parameters()).is_cuda:
            torch.backends.cuda.enable_cudnn_sdp(False)
        applied.append(f"compile ({done} of {total} blocks" + (")" if done == total else
                                                             "; the checkpointed ones run eagerly)"))
    return applied


def _first_blocks(transformer, n_double: int, n_single: int) -> set:
    """ids of the first n_double double-stream and n_single single-stream blocks (the checkpointed ones)."""
    return ({id(b) for b in list(transformer.transformer_blocks)[:n_double]}
            | {id(b) for b in list(transformer.single_transformer_blocks)[:n_single]})


def checkpointed_block_ids(transformer) -> set:
    """ids of the blocks that set_checkpointed_blocks checkpoints (none while checkpointing is off; every
    block when diffusers' own enable_gradient_checkpointing turned it on)."""
    if not transformer.gradient_checkpointing:
        return set()
    return _first_blocks(transformer, *getattr(transformer, "_etchr_checkpointed", block_counts(transformer)))


def compile_blocks(transformer, *, fullgraph: bool, checkpointed_too: bool = False) -> tuple[int, int]:
    """torch.compile each double- and single-stream block in place (Module.compile: names and state_dict keys
    unchanged), skipping the checkpointed ones unless `checkpointed_too`. Returns (compiled, blocks)."""
    skip = set() if checkpointed_too else checkpointed_block_ids(transformer)
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    done = 0
    for block in blocks:
        if id(block) not in skip:
            block.compile(fullgraph=fullgraph)
            done += 1
    return done, len(blocks)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device, max_sequence_length: int = 512):
    """(prompt_embeds (B, 512, joint_dim), text_ids (B, 512, 4)) with the frozen Qwen3 encoder."""
    return pipe.encode_prompt(prompt=prompts, device=device, max_sequence_length=max_sequence_length)


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> normalised patchified latents (B, 4*z, H/16, W/16): VAE
    posterior mean, 2x2 patchify, BatchNorm running-stat normalisation (the pipeline's own code)."""
    vae = pipe.vae
    return pipe._encode_vae_image(images.to(device=vae.device, dtype=vae.dtype), generator=None)


def pack(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, h, w) -> tokens (B, h*w, C) and their RoPE ids (B, h*w, 4) with t = 0."""
    from diffusers import Flux2KleinPipeline as P

    return P._pack_latents(latents), P._prepare_latent_ids(latents).to(latents.device)


def pack_reference(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, h, w) reference latents -> tokens (B, h*w, C) and ids (B, h*w, 4) with t = 10."""
    from diffusers import Flux2KleinPipeline as P

    ids = P._prepare_image_ids([latents[:1]]).to(latents.device)  # one reference image per sample
    return P._pack_latents(latents), ids.expand(latents.shape[0], -1, -1)


def velocity(transformer, x_t: torch.Tensor, x_ids: torch.Tensor, ref: torch.Tensor, ref_ids: torch.Tensor,
             timestep: torch.Tensor, prompt_embeds: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
    """The DiT's velocity for the target tokens only (B, L_target, C); reference tokens are clean and
    share the timestep modulation."""
    dtype = next(transformer.parameters()).dtype
    hidden = torch.cat([x_t, ref], dim=1).to(dtype)
    out = transformer(hidden_states=hidden, timestep=timestep.to(dtype), guidance=None,
                      encoder_hidden_states=prompt_embeds.to(dtype), txt_ids=text_ids,
                      img_ids=torch.cat([x_ids, ref_ids], dim=1), return_dict=False)[0]
    return out[:, : x_t.shape[1]]


class TensorCache:
    """Optional on-disk cache of text embeddings / reference latents, keyed by content."""

    def __init__(self, root: Optional[str]):
        self.root = Path(root) if root else None
        if self.root:
            self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:32]

    def get(self, key: str):
        if self.root is None:
            return None
        p = self.root / f"{key}.pt"
        return torch.load(p, map_location="cpu", weights_only=True) if p.is_file() else None

    def put(self, key: str, value) -> None:
        if self.root is None:
            return
        p = self.root / f"{key}.pt"
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        torch.save(value, tmp)
        os.replace(tmp, p)


# ---------------------------------------------------------------------------------------------------------
# Activation memory by budget (issue #17): checkpoint only as many blocks as a peak-memory budget needs.
# FLUX.2-klein's double-stream and single-stream blocks do the same work per token (13 d^2 multiply-adds
# per token: a double block's 436 M parameters are two 218 M streams, each token passes one; a single block
# has 218 M) plus the same joint attention, so every block left un-checkpointed saves one block forward of
# recomputation; what differs is the memory its saved activations take.
# ---------------------------------------------------------------------------------------------------------
def block_counts(transformer) -> tuple[int, int]:
    """(double-stream blocks, single-stream blocks) of a Flux2Transformer2DModel (9B: 8, 24)."""
    return len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)


def set_checkpointed_blocks(transformer, n_double: int, n_single: int) -> tuple[int, int]:
    """Checkpoint the first `n_double` double-stream and the first `n_single` single-stream blocks and run the
    others plainly (they keep their activations for the backward: no recomputation, more memory). The plain
    blocks are the last of each stack: the backward reaches them first, so their activations are freed
    before any checkpointed block is recomputed. (all, all) is diffusers' per-block checkpointing, (0, 0)
    none at all. Works through diffusers' own hook: the transformer's forward hands each block to
    `_gradient_checkpointing_func` when checkpointing is on and grad is enabled (no-grad rollouts and
    validation never checkpoint). Returns the clamped (n_double, n_single)."""
    nd, ns = block_counts(transformer)
    n_double, n_single = max(0, min(int(n_double), nd)), max(0, min(int(n_single), ns))
    if n_double == 0 and n_single == 0:
        if transformer.gradient_checkpointing:
            transformer.disable_gradient_checkpointing()
        transformer._etchr_checkpointed = (0, 0)
        return 0, 0
    chosen = _first_blocks(transformer, n_double, n_single)

    def selective_checkpoint(block, *args):
        if id(block) in chosen:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    transformer.enable_gradient_checkpointing(selective_checkpoint)
    transformer._etchr_checkpointed = (n_double, n_single)
    return n_double, n_single


def plan_checkpointing(n_double: int, n_single: int, base_gib: float, double_gib: float, single_gib: float,
                       budget_gib: float) -> dict:
    """How many blocks to keep checkpointed so the predicted peak stays within `budget_gib`.

    base_gib: the step's peak with every block checkpointed; double_gib / single_gib: the extra peak of one
    un-checkpointed double / single block (its saved activations). Predicted peak = base + plain_d * double
    + plain_s * single. Leaves as many blocks un-checkpointed as fit (each saves one block forward of
    recomputation, the same for both kinds); among equal counts the lower predicted peak wins. Nothing fits
    (base > budget): everything stays checkpointed. Returns {"checkpointed": [n_double, n_single],
    "plain": [...], "predicted_peak_gib": ...}."""
    eps = 1e-9
    best = (0, 0)
    for plain_d in range(n_double + 1):
        room = budget_gib - base_gib - plain_d * double_gib
        if room < -eps:
            break
        plain_s = n_single if single_gib <= 0 else min(n_single, int(math.floor((room + eps) / single_gib)))
        cand, peak = (plain_d, plain_s), plain_d * double_gib + plain_s * single_gib
        best_peak = best[0] * double_gib + best[1] * single_gib
        if sum(cand) > sum(best) or (sum(cand) == sum(best) and peak < best_peak):
            best = cand
    plain_d, plain_s = best
    return {"checkpointed": [n_double - plain_d, n_single - plain_s], "plain": [plain_d, plain_s],
            "predicted_peak_gib": round(base_gib + plain_d * double_gib + plain_s * single_gib, 3)}


def _storages(tensors) -> set:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


def saved_activation_bytes(block, args: tuple) -> int:
    """Bytes a plain (un-checkpointed) block keeps alive for its backward on these inputs: the distinct
    storages autograd saves, less the parameters and the block's inputs and outputs (alive either way).
    Runs one forward with grad enabled (works on any device)."""
    params = _storages(block.parameters())
    inputs = _storages(args)
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in inputs:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(*args)
    outs = _storages(out if isinstance(out, (tuple, list)) else [out])
    total = sum(n for ptr, n in seen.items() if ptr not in outs)
    del out
    return total


def probe_inputs(transformer, batch: int, image_tokens: int, text_tokens: int) -> dict:
    """Random keyword inputs of one DiT forward: `image_tokens` (target + reference) and `text_tokens`, on
    the transformer's device and dtype."""
    p = next(transformer.parameters())
    cfg = transformer.config
    g = torch.Generator(device="cpu").manual_seed(0)
    return {"hidden_states": torch.randn(batch, image_tokens, cfg.in_channels, generator=g).to(p.device, p.dtype),
            "img_ids": torch.zeros(batch, image_tokens, 4, dtype=torch.long, device=p.device),
            "encoder_hidden_states": torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=g).to(
                p.device, p.dtype),
            "txt_ids": torch.zeros(batch, text_tokens, 4, dtype=torch.long, device=p.device),
            "timestep": torch.full((batch,), 0.5, device=p.device, dtype=p.dtype), "guidance": None,
            "return_dict": False}


def probe_activation_memory(transformer, inputs: dict, optimizer_state_bytes: int) -> dict:
    """Measure, on CUDA, what plan_checkpointing needs at the shape of `inputs` (call before the optimizer's
    first step and before DDP wrapping: it runs a forward + backward into the parameters' .grad, then clears
    them). base_gib: the peak of a forward + backward with every block checkpointed (torch.cuda memory
    stats), plus the optimizer state the first step will allocate (`optimizer_state_bytes`, resident from
    then on). double_gib / single_gib: saved_activation_bytes of the first block of each kind on the inputs
    it received in that pass."""
    if not torch.cuda.is_available() or next(transformer.parameters()).device.type != "cuda":
        raise RuntimeError("probe_activation_memory measures CUDA memory: the transformer is not on a CUDA device")
    nd, ns = block_counts(transformer)
    captured: dict[str, tuple] = {}
    doubles0, singles0 = transformer.transformer_blocks[0], transformer.single_transformer_blocks[0]

    def capturing(block, *args):
        for name, first in (("double", doubles0), ("single", singles0)):
            if block is first and name not in captured:
                captured[name] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    was_training = transformer.training
    transformer.train()
    transformer.enable_gradient_checkpointing(capturing)
    params = [p for p in transformer.parameters() if p.requires_grad]
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        out = transformer(**inputs)[0]
        out.float().square().mean().backward()
        del out
        torch.cuda.synchronize()
        base = torch.cuda.max_memory_allocated() + optimizer_state_bytes
        for p in params:
            p.grad = None
        sizes = {}
        for name, block in (("double", doubles0), ("single", singles0)):
            # the activations (hidden states, text stream) carry grad in every block but the first
            args = tuple(a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() and i < 2
                         else a for i, a in enumerate(captured[name]))
            sizes[name] = saved_activation_bytes(block, args)
        del captured
    finally:
        for p in params:
            p.grad = None
        transformer.train(was_training)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    gib = 2 ** 30
    return {"blocks": [nd, ns], "base_gib": round(base / gib, 3), "double_gib": round(sizes["double"] / gib, 4),
            "single_gib": round(sizes["single"] / gib, 4)}


def budget_gib(value, fraction: float) -> float:
    """model.activation_budget_gib as GiB: a number as given, 'auto' = `fraction` of this CUDA card's memory."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        if not torch.cuda.is_available():
            raise RuntimeError("model.activation_budget_gib=auto needs a CUDA device (its size decides the budget)")
        return fraction * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2 ** 30
    return float(value)


def adamw_state_bytes(params) -> int:
    """Bytes torch AdamW allocates at its first step: exp_avg and exp_avg_sq in each parameter's dtype."""
    return sum(2 * p.numel() * p.element_size() for p in params)


def configure_checkpointing(transformer, model_cfg, *, batch: int, image_tokens: int, text_tokens: int,
                            optimizer_state_bytes: int) -> dict:
    """Apply model.checkpoint_blocks / model.activation_budget_gib / model.gradient_checkpointing (in that
    order of precedence) and return the decision for the log and metrics. Budget mode probes (CUDA only: on
    CPU it refuses, since nothing there measures device memory; pin model.checkpoint_blocks instead) at the
    largest shape the run can feed, `image_tokens` target + reference tokens and `text_tokens`, so that no
    later, smaller aspect bucket can exceed the plan. Call after LoRA, before torch.compile and DDP."""
    nd, ns = block_counts(transformer)
    if model_cfg.checkpoint_blocks is not None:
        n = set_checkpointed_blocks(transformer, *list(model_cfg.checkpoint_blocks))
        return {"mode": "pinned", "checkpointed": list(n), "blocks": [nd, ns]}
    budget = model_cfg.activation_budget_gib
    if not (isinstance(budget, (int, float)) and float(budget) == 0):
        if not torch.cuda.is_available() or next(transformer.parameters()).device.type != "cuda":
            from .config import ConfigError

            raise ConfigError(f"model.activation_budget_gib={budget}: budget mode measures CUDA memory and needs the "
                               f"transformer on a CUDA device; on CPU pin model.checkpoint_blocks=[n_double,n_single] "
                               f"or use model.activation_budget_gib=0")
        target = budget_gib(budget, model_cfg.activation_budget_fraction)
        set_checkpointed_blocks(transformer, nd, ns)
        probe = probe_activation_memory(transformer, probe_inputs(transformer, batch, image_tokens, text_tokens),
                                        optimizer_state_bytes)
        plan = plan_checkpointing(nd, ns, probe["base_gib"], probe["double_gib"], probe["single_gib"], target)
        n = set_checkpointed_blocks(transformer, *plan["checkpointed"])
        return {"mode": "budget", "budget_gib": round(target, 3), "checkpointed": list(n), "blocks": [nd, ns],
                "plain": plan["plain"], "predicted_peak_gib": plan["predicted_peak_gib"],
                "probe": {**probe, "batch": batch, "image_tokens": image_tokens, "text_tokens": text_tokens}}
    if model_cfg.gradient_checkpointing:
        return {"mode": "all", "checkpointed": list(set_checkpointed_blocks(transformer, nd, ns)), "blocks": [nd, ns]}
    return {"mode": "none", "checkpointed": list(set_checkpointed_blocks(transformer, 0, 0)), "blocks": [nd, ns]}
