"""Rollouts: a group of G SDE trajectories for one prompt, with per-step log-probabilities.

Text embeddings and reference latents are computed once per prompt. Initial noise is seeded per
(seed, step, prompt, rank, sample), or per (seed, step, prompt, rank) for the whole group with
same_init_noise_in_group (the reference used one unseeded noise for everything: PROTOCOL.md 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .model import decode, encode_prompt, encode_reference, latent_grid, output_size, prepare_source, target_ids, velocity
from .sde import clean_estimate, sde_step, sigma_schedule


@dataclass
class Group:
    """One prompt's rollouts. Tensors live on CPU between sampling and training."""
    prompt_index: int
    states: torch.Tensor  # (G, S, L, C) x_0 .. x_{S-1}: the inputs of each transition
    next_states: torch.Tensor  # (G, S-1, L, C) sampled x_{k+1} of transitions 0 .. S-2 (the last is not trained)
    logps: torch.Tensor  # (G, S-1) log-probabilities of those transitions under the sampling policy
    means: torch.Tensor  # (G, S-1, L, C) their Gaussian means (for the rationorm ratio)
    images: list = field(default_factory=list)  # G decoded edits (PIL)
    size: tuple = (0, 0)  # (W, H)
    # The prompt's conditioning, computed once for sampling and reused by training (on the device).
    embeds: torch.Tensor = None  # (1, 512, D) text embeddings
    text_ids: torch.Tensor = None  # (1, 512, 4)
    ref: torch.Tensor = None  # (1, L_ref, C) reference tokens
    ref_ids: torch.Tensor = None  # (1, L_ref, 4)


def noise_generator(seed: int, step: int, prompt: int, rank: int, sample: int, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((((seed * 1_000_003 + step) * 10_007 + prompt) * 101 + rank) * 1_009 + sample)
    return g


@torch.no_grad()
def sample_group(pipe, transformer, prompt: str, source, *, group_size: int, steps: int, shift: float, eta: float,
                 seed: int, step: int, prompt_index: int, rank: int, same_init_noise: bool, resize: str,
                 max_area: int, size: int, max_sequence_length: int = 512, batch_group: bool = True,
                 chunk: int = 0, on_chunk: Optional[Callable[[list, list], None]] = None) -> Group:
    """G trajectories of one prompt, sampled in chunks of `chunk` samples (0 = the whole group).

    Each chunk runs all its steps and is decoded before the next one starts; `on_chunk(indices, images)` is
    called right after each decode (the trainer submits that chunk's reward scoring there, so the judge works
    while the next chunk samples). Within a chunk the forward is one batch (batch_group) or one sample at a
    time. Every sample draws its noise from its own generators in step order, so the trajectories do not
    depend on the chunking (up to the rounding of different batch sizes).
    """
    device = next(transformer.parameters()).device
    source = prepare_source(source.convert("RGB"), resize)
    width, height = output_size(*source.size, resize, max_area, size)
    embeds, text_ids = encode_prompt(pipe, prompt, device, max_sequence_length)
    ref, ref_ids = encode_reference(pipe, source, device)  # once per prompt
    h, w = latent_grid(pipe, width, height)
    channels = transformer.config.in_channels
    gens = [noise_generator(seed, step, prompt_index, rank, 0 if same_init_noise else j) for j in range(group_size)]
    x0 = torch.stack([torch.randn(h * w, channels, generator=g) for g in gens])
    step_gens = [noise_generator(seed, step, prompt_index, rank, 10_000 + j) for j in range(group_size)]
    sigmas = sigma_schedule(steps, shift)
    per_chunk = chunk if 0 < chunk < group_size else group_size
    parts, images = [], []
    for start in range(0, group_size, per_chunk):
        indices = list(range(start, min(start + per_chunk, group_size)))
        part = _sample_chunk(transformer, x0[indices].to(device), [step_gens[j] for j in indices], sigmas, eta,
                             embeds, text_ids, ref, ref_ids, h, w, batch_group)
        chunk_images = decode(pipe, part.pop("final"), h, w)
        if on_chunk is not None:
            on_chunk(indices, chunk_images)
        parts.append(part)
        images.extend(chunk_images)
    cat = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    return Group(prompt_index=prompt_index, states=cat["states"], next_states=cat["next_states"], logps=cat["logps"],
                 means=cat["means"], images=images, size=(width, height), embeds=embeds, text_ids=text_ids, ref=ref,
                 ref_ids=ref_ids)


def _sample_chunk(transformer, x, step_gens, sigmas, eta, embeds, text_ids, ref, ref_ids, h, w,
                  batch: bool) -> dict:
    """All S steps of len(step_gens) samples starting from x (B, L, C) on the device; tensors to CPU."""
    device = x.device
    n, channels = x.shape[0], x.shape[2]
    steps = len(sigmas) - 1
    ids = target_ids(h, w, n, device)
    sub = [list(range(n))] if batch else [[i] for i in range(n)]
    states, nexts, logps, means = [], [], [], []
    for k in range(steps):
        sigma = torch.tensor([float(sigmas[k])], device=device)
        v = torch.cat([velocity(transformer, x[c], ids[c], ref, ref_ids, sigma, embeds, text_ids) for c in sub])
        states.append(x.cpu())
        if k == steps - 1:
            x = clean_estimate(x, v, float(sigmas[k]))  # the last step decodes x - sigma v
            break
        noise = torch.stack([torch.randn(h * w, channels, generator=g) for g in step_gens]).to(device)
        x, lp, mu = sde_step(x, v, sigmas, k, eta, noise)
        nexts.append(x.cpu())
        logps.append(lp.cpu())
        means.append(mu.cpu())
    return {"states": torch.stack(states, 1), "next_states": torch.stack(nexts, 1), "logps": torch.stack(logps, 1),
            "means": torch.stack(means, 1), "final": x}
