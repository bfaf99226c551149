"""FLUX.2-klein parts for GRPO: loading, LoRA targets, encoders, the DiT velocity, decoding.

The DiT sees [text | noisy target tokens | clean reference tokens] with RoPE ids text (0,0,0,l),
target (0,h,w,0), reference (10,h,w,0), built with the pipeline's own helpers (PROTOCOL.md 0).
(SFT keeps its own copy of the shared parts: the trees share files, never code.)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
REFERENCE_AREA = 1024 * 1024


def load_pipeline(path: str, dtype: torch.dtype):
    from diffusers import Flux2KleinPipeline

    if not Path(path, "model_index.json").is_file():
        raise FileNotFoundError(f"{path}: not a diffusers FLUX.2-klein pipeline dir (model_index.json missing)")
    pipe = Flux2KleinPipeline.from_pretrained(path, dtype=dtype)
    for frozen in (pipe.vae, pipe.text_encoder):
        frozen.requires_grad_(False)
        frozen.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_target_names(transformer, suffixes: list[str]) -> list[str]:
    """Linear layers whose name ends with one of `suffixes` on a dot boundary (RL: 120 on the 9B)."""
    names = [n for n, m in transformer.named_modules()
             if isinstance(m, torch.nn.Linear) and any(n == s or n.endswith("." + s) for s in suffixes)]
    if not names:
        raise ValueError(f"no Linear layer matches the LoRA targets {suffixes}")
    return names


def add_lora(transformer, rank: int, alpha: float, targets: list[str]):
    from peft import LoraConfig

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
    transformer.add_adapter(cfg)
    return cfg


def apply_speed_options(transformer, *, attention_backend: str = "native", compile: bool = False) -> None:
    """The RL speed switches (config model.attention_backend, model.compile); call after LoRA, gradient
    checkpointing and the move to the device.

    attention_backend: diffusers' attention dispatch ("native" leaves torch SDPA's own choice).
    compile: regional torch.compile of the repeated blocks (as Evaluation's editor), used by the rollout (no
    grad) and by training (grad, through gradient checkpointing). Graph breaks are allowed, so that peft's
    LoRA layers or checkpointing can never turn a run into an error. Shapes: dynamo's default (dynamic=None):
    the first shape compiles static; the first time another shape comes (another source aspect ratio with
    data.resize=keep_aspect, a rollout chunk or micro-batch remainder) it recompiles once with those dims
    dynamic, so a run holds a bounded number of graphs. (dynamic=False would compile one graph per distinct
    resolution and batch, reach dynamo's recompile limit on keep_aspect data and then run those shapes eager;
    padding to fixed sizes would change the numbers.) With center_crop and a micro_batch / rollout_chunk that
    divide the window / group, every shape is static.
    """
    from .config import check_attention_backend

    check_attention_backend(attention_backend, device_type=next(transformer.parameters()).device.type)
    if attention_backend != "native":
        transformer.set_attention_backend(attention_backend)
    if compile:
        transformer.compile_repeated_blocks(fullgraph=False)


def output_size(width: int, height: int, mode: str, max_area: int, size: int) -> tuple[int, int]:
    """(W, H) of the rollout: keep_aspect (area <= max_area, sides floored to 16, as Evaluation) or
    center_crop (the reference's size x size square)."""
    if mode == "center_crop":
        return size // 16 * 16, size // 16 * 16
    scale = min(1.0, math.sqrt(max_area / float(width * height)))
    return max(16, int(width * scale) // 16 * 16), max(16, int(height * scale) // 16 * 16)


def prepare_source(image: Image.Image, mode: str) -> Image.Image:
    """center_crop mode: crop the source to its central square first (the reference's resize_mode='crop')."""
    if mode != "center_crop":
        return image
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


@torch.no_grad()
def encode_prompt(pipe, prompt: str, device, max_sequence_length: int = 512):
    """(embeds (1, 512, D), text_ids (1, 512, 4))."""
    return pipe.encode_prompt(prompt=[prompt], device=device, max_sequence_length=max_sequence_length)


@torch.no_grad()
def encode_reference(pipe, image: Image.Image, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The condition image exactly as Flux2KleinPipeline prepares it -> tokens (1, L, C), ids t=10."""
    from diffusers import Flux2KleinPipeline as P

    w, h = image.size
    if w * h > REFERENCE_AREA:
        image = pipe.image_processor._resize_to_target_area(image, REFERENCE_AREA)
        w, h = image.size
    w, h = w // 16 * 16, h // 16 * 16
    pixels = pipe.image_processor.preprocess(image, height=h, width=w, resize_mode="crop")
    latents = pipe._encode_vae_image(pixels.to(device=device, dtype=pipe.vae.dtype), generator=None)
    return P._pack_latents(latents), P._prepare_image_ids([latents]).to(device)


def latent_grid(pipe, width: int, height: int) -> tuple[int, int]:
    """(h, w) of the packed latent grid for an output of width x height pixels."""
    f = pipe.vae_scale_factor * 2
    return height // f, width // f


def target_ids(h: int, w: int, batch: int, device) -> torch.Tensor:
    from diffusers import Flux2KleinPipeline as P

    return P._prepare_latent_ids(torch.empty(batch, 1, h, w)).to(device)


def velocity(transformer, x: torch.Tensor, x_ids: torch.Tensor, ref: torch.Tensor, ref_ids: torch.Tensor,
             sigma: torch.Tensor, embeds: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
    """(B, L, C) velocity of the target tokens; ref / embeds broadcast over the batch."""
    b = x.shape[0]
    dtype = next(transformer.parameters()).dtype
    hidden = torch.cat([x, ref.expand(b, -1, -1)], dim=1).to(dtype)
    ids = torch.cat([x_ids, ref_ids.expand(b, -1, -1)], dim=1)
    out = transformer(hidden_states=hidden, timestep=sigma.to(dtype).expand(b), guidance=None,
                      encoder_hidden_states=embeds.expand(b, -1, -1).to(dtype), txt_ids=text_ids.expand(b, -1, -1),
                      img_ids=ids, return_dict=False)[0]
    return out[:, : x.shape[1]].float()


@torch.no_grad()
def decode(pipe, tokens: torch.Tensor, h: int, w: int) -> list[Image.Image]:
    """Packed clean latents (B, h*w, C) -> PIL images, as the pipeline's own epilogue."""
    b = tokens.shape[0]
    ids = target_ids(h, w, b, tokens.device)
    latents = pipe._unpack_latents_with_ids(tokens, ids, h, w)
    vae = pipe.vae
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device, latents.dtype)
    latents = pipe._unpatchify_latents(latents * std + mean)
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")


# (a deliberate copy of SFT's etchr_sft/model.py section: the trees share no code)
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
    chosen = {id(b) for b in list(transformer.transformer_blocks)[:n_double]}
    chosen |= {id(b) for b in list(transformer.single_transformer_blocks)[:n_single]}

    def selective_checkpoint(block, *args):
        if id(block) in chosen:
            # the block's eager forward (Module._call_impl), also when model.compile compiled it: a compiled
            # block under the checkpoint wrapper trained on wrong LoRA gradients on an H200 with torch 2.11
            # (docs/PERFORMANCE.md, "Compiled backward"); its compiled graph still serves the no-grad rollouts
            return torch.utils.checkpoint.checkpoint(block._call_impl, *args, use_reentrant=False)
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
        return torch.utils.checkpoint.checkpoint(block._call_impl, *args, use_reentrant=False)

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


def planning_image_tokens(resize: str, max_area: int, size: int, reference_pixels: int) -> int:
    """Target + reference tokens of the largest training transition (16x16 pixels per token): the target
    of output_size (keep_aspect: area <= max_area; center_crop: size x size) and a condition image of
    `reference_pixels` (encode_reference caps it at 1024^2)."""
    target = (size // 16) ** 2 if resize == "center_crop" else max_area // 256
    return target + min(reference_pixels, REFERENCE_AREA) // 256
