#!/usr/bin/env python
"""bench_rl_group: one GRPO group (G=8, 25 SDE steps, 720x720, 14 trained transitions per sample) of
rollout + reward scoring + training, the reference-style loop against ours (RL/train_grpo.py).

    python scripts/bench/bench_rl_group.py [--variants reference,ours_eager,ours_compile] [--latency 1.0]
        [--group 8] [--steps 25] [--trained-steps 14] [--size 720] [--out results.jsonl]
    python scripts/bench/bench_rl_group.py --tiny [--tiny-models DIR]     # CPU smoke test, tiny twin, fp32

On a GPU: FLUX.2-klein-base-9B at full shape with random bf16 weights (configs from
scripts/make_tiny_models.py --full-shape, built directly on the card by benchlib.build_pipeline), the RL
LoRA (rank 64, alpha 128, the RL targets) and gradient checkpointing (the RL default) for every variant.
One process, one card, one prompt and source image, the same seeds. Variants (eager ones first: compilation
is permanent for the rest of the process):
  reference     the reference's loop: for each of the G samples, encode the prompt (text encoder) and the
                reference image, 25 SDE steps at batch 1, decode; then every reward request one at a time
                (judge concurrency 1); then the 8 x 14 transitions one forward + backward each
                (train_iteration with micro_batch 1).
  ours_eager    RL/train_grpo.py's sample_and_score (the group as one batch, in chunks of --rollout-chunk
                samples, each chunk scored in the background as soon as it is decoded) and train_iteration
                with --micro-batch transitions per forward.
  ours_batch    as ours_eager with micro_batch 1 (isolates the rollout/scoring change).
  ours_attn     as ours_eager with model.attention_backend=--attention-backend.
  ours_compile  as ours_eager with model.compile=true (regional torch.compile).
  ours_full     all switches: micro-batches, rollout chunks, --attention-backend and compile.
  ours_budget80 as ours_eager with model.activation_budget_gib=76 (issue #17: only as many blocks checkpointed
                as an 80 GB card's budget needs, planned by the trainer's probe at the training micro-batch's
                shape; emulated on a larger card); ours_budget_auto (0.9 of this card), ours_budget80_compile,
                ours_full_budget80 (all switches + the budget). --define NAME=key=value,... adds a variant with
                any RL config overrides, micro-batched, compiled if model.compile=true.
  ours_fp8      as ours_eager with model.fp8=float8_rowwise (torchao float8 matmuls in the frozen LoRA base
                layers, rollout and training; converted for the variant, plain Linear again after it);
                ours_fp8_full: all switches + fp8.
  Every ours_* variant chooses its checkpointed blocks with etchr_rl.model.configure_checkpointing, as
  train_grpo.py does (default: all, as the reference); the row's activation_checkpointing says what it chose.
Default: reference,ours_full (about 6 minutes on an H100; each further variant adds 1.5-2 minutes).
Before the variants, an attention probe times a few rollout forwards (batch --rollout-chunk) and training
forward + backward passes (batch --micro-batch) with native attention and with --attention-backend; if the
backend fails there, the variants that use it fall back to native and say so ("attention_backend_fallback").
Rewards go through the RL code (rewards.compute_rewards -> judge.JudgeClient) to a local OpenAI-compatible
stub answering "1" after --latency seconds (guidance: answer + judge rounds; correctness: one round).
Advantages are fixed (seeded), and every variant trains on the reference's trajectories when the reference
ran, so that the training fidelity compares like with like (timing does not depend on the data).

Per variant, timing ONE group after a short warm-up (a 2-step group with the same batch shapes, and one
training forward + backward per micro-batch size): seconds (rollout / reward wait / train split), ratio to
the reference, the GPU-only seconds (rollout + train: what a zero-latency judge would give) and its ratio,
achieved TFLOP/s over the DiT work (FLOPs of one rollout forward and of one training transition counted with
torch.utils.flop_counter), the fraction of a bf16 matmul ceiling measured in the same run, peak memory, and
fidelity against the reference: max |logp difference| and relative error of the last states of the rollout,
relative error of the first optimizer step's LoRA gradient (LoRA B starts non-zero, --lora-b-std, so that
gradient includes lora_A's) and of the LoRA update. JSON lines go to stdout and
are appended to --out as each variant finishes; an error in one variant is reported and the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from benchlib import (REPO, StubEndpoint, full_shape_pipeline, load_script, make_tiny_models,  # noqa: E402
                      matmul_ceiling)

sys.path.insert(0, str(REPO / "RL"))

# name -> micro (micro-batched training), attn (the --attention-backend), compile, overrides (further RL config
# keys as on the command line: another switch is one entry here or one --define away, e.g. ours_fp8).
BUDGET80 = {"model.activation_budget_gib": "76"}  # an 80 GB card's budget, emulated on a larger one
VARIANTS: dict[str, dict] = {
    "ours_batch": {"micro": False},
    "ours_eager": {"micro": True},
    "ours_attn": {"micro": True, "attn": True},
    "ours_compile": {"micro": True, "compile": True},
    "ours_full": {"micro": True, "attn": True, "compile": True},
    "ours_budget80": {"micro": True, "overrides": BUDGET80},
    "ours_budget_auto": {"micro": True, "overrides": {"model.activation_budget_gib": "auto"}},
    "ours_budget80_compile": {"micro": True, "compile": True, "overrides": BUDGET80},
    "ours_full_budget80": {"micro": True, "attn": True, "compile": True, "overrides": BUDGET80},
    # model.fp8: torchao float8 for the frozen LoRA base layers, rollouts and training (refused without an fp8 GPU)
    "ours_fp8": {"micro": True, "overrides": {"model.fp8": "float8_rowwise"}},
    "ours_fp8_full": {"micro": True, "attn": True, "compile": True, "overrides": {"model.fp8": "float8_rowwise"}},
}


def parse_define(text: str) -> tuple[str, dict]:
    """'NAME=key=value,key=value' -> (NAME, variant): micro-batched, the config overrides given (model.compile=true
    in them compiles; a list value such as [1,1] keeps its commas)."""
    import re

    name, _, rest = text.partition("=")
    overrides = {}
    for item in filter(None, (x.strip() for x in re.split(r",(?=\s*[\w.]+=)", rest))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--define {text!r}: expected NAME=key=value[,key=value...]")
        overrides[key] = value
    if not name or name == "reference":
        raise ValueError(f"--define {text!r}: needs a variant name other than reference")
    compile_ = str(overrides.pop("model.compile", "false")).lower() == "true"
    return name, {"micro": True, "compile": compile_, "overrides": overrides}


# ---------------------------------------------------------------------------------------------- the bench
class Bench:
    def __init__(self, a, emit):
        self.a, self.emit = a, emit
        self.cuda = not a.tiny
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.tg = load_script("RL/train_grpo.py", "etchr_rl_train_grpo")
        self.results: dict[str, dict] = {}
        self.reference = None  # the reference variant's groups, gradient and LoRA update
        self.compiled = False
        self.backend = "native"

    # ---- setup
    def config(self, *, micro: int = 1, chunk: int = 0, backend: str = "native", compile: bool = False,
               steps: int | None = None, overrides: dict | None = None):
        from etchr_rl.config import load_rl_config

        a = self.a
        S = steps or a.steps
        fraction = 1.0 if a.trained_steps >= S - 1 else (a.trained_steps + 0.5) / (S - 1)
        return load_rl_config(None, [
            "model.pretrained_path=unused", "data.jsonl=unused", f"model.dtype={'bf16' if self.cuda else 'fp32'}",
            f"model.attention_backend={backend}", f"model.compile={str(compile).lower()}",
            f"lora.rank={a.lora_rank}", f"lora.alpha={2 * a.lora_rank}", "data.resize=center_crop",
            f"data.size={a.size}", f"sampling.group_size={a.group}", f"sampling.steps={S}",
            f"sampling.timestep_fraction={fraction}", f"sampling.rollout_chunk={chunk}",
            f"train.grad_accum={a.grad_accum}", f"train.micro_batch={micro}", f"judge.endpoints=[{self.stub.url}]",
            "judge.model=stub", "judge.max_retries=0", "judge.timeout_s=120",
            f"model.activation_reference_pixels={a.size * a.size}",  # the bench's source image: the largest fed
            *[f"{k}={v}" for k, v in (overrides or {}).items()]])

    def setup(self):
        from PIL import Image

        from etchr_rl.data import Prompt
        from etchr_rl.judge import JudgeClient
        from etchr_rl.model import add_lora, load_pipeline, lora_target_names

        a = self.a
        if self.cuda:
            self.ceiling = matmul_ceiling()
            self.emit({"matmul_ceiling_tflops": round(self.ceiling, 1)})
            t0 = time.time()
            self.pipe = full_shape_pipeline()
            for frozen in (self.pipe.vae, self.pipe.text_encoder):  # as etchr_rl.model.load_pipeline
                frozen.requires_grad_(False)
                frozen.eval()
        else:
            self.ceiling = None
            root = Path(a.tiny_models) if a.tiny_models else Path(tempfile.mkdtemp()) / "tiny"
            if not (root / "flux2-klein-tiny" / "model_index.json").is_file():
                make_tiny_models().build(root, seed=0)
            t0 = time.time()
            self.pipe = load_pipeline(str(root / "flux2-klein-tiny"), torch.float32)
        self.stub = StubEndpoint(a.latency, lambda body: "1")  # every judge verdict: yes
        cfg = self.config()
        transformer = self.transformer = self.pipe.transformer
        transformer.requires_grad_(False)
        targets = lora_target_names(transformer, list(cfg.lora.targets))
        torch.manual_seed(0)
        add_lora(transformer, cfg.lora.rank, cfg.lora.alpha, targets)
        if a.lora_b_std > 0:  # peft starts B at 0, where every lora_A gradient is exactly 0 (see --lora-b-std)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for n, p in transformer.named_parameters():
                    if "lora_B" in n:
                        p.copy_(torch.randn(p.shape, generator=g) * a.lora_b_std)
        if cfg.model.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.to(self.device)
        named = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.is_lora_a = torch.cat([torch.full((p.numel(),), "lora_A" in n) for n, p in named])
        self.initial = [p.detach().clone() for p in self.params]
        self.emit({"built_s": round(time.time() - t0, 1),
                   "transformer_params": sum(p.numel() for p in transformer.parameters()),
                   "lora_params": sum(p.numel() for p in self.params), "lora_layers": len(targets),
                   "gradient_checkpointing": bool(cfg.model.gradient_checkpointing)})
        g = torch.Generator().manual_seed(0)
        self.source = Image.fromarray((torch.rand(a.size, a.size, 3, generator=g) * 255).byte().numpy())
        self.prompt = Prompt(id="0", instruction="Draw a red box around the object that answers the question. "
                             "Question: which object is left of the cup?", question="Which object is left of the cup?",
                             answer="the bottle", source_image="", meta={})
        self.names = list(cfg.reward.weights)
        self.bg = self.tg.BackgroundLoop()
        self.judge_seq = JudgeClient([self.stub.url], "stub", concurrency=1, max_retries=0, timeout_s=120)
        self.judge = JudgeClient.from_config(cfg.judge)
        self.bg.submit(self.judge.check_reachable()).result()
        adv = torch.randn(a.group, generator=torch.Generator().manual_seed(1))
        self.adv = ((adv - adv.mean()) / (adv.std() + 1e-8)).clamp(-5, 5)
        self.count_flops()
        self.backend_error = None
        if a.attention_backend != "native" and any(VARIANTS.get(v, {}).get("attn") for v in a.variant_list):
            self.probe_attention()

    def set_backend(self, backend: str):
        from etchr_rl.model import apply_speed_options

        if backend != self.backend:
            if backend == "native":
                self.transformer.set_attention_backend("native")
            else:
                apply_speed_options(self.transformer, attention_backend=backend)
            self.backend = backend

    def probe_attention(self):
        """Seconds per rollout forward (batch rollout_chunk) and per training forward + backward (batch
        micro_batch), eager, native attention vs --attention-backend; an error disables that backend."""
        from etchr_rl.model import latent_grid, target_ids, velocity
        from etchr_rl.sde import sigma_schedule

        a = self.a
        reps = 1 if a.tiny else 3
        cfg = self.config(steps=2)
        wg = self.ours_rollout(cfg, names=[])[0][0]
        n_roll = min(a.rollout_chunk or a.group, a.group)
        mb = [(0, j % a.group, 0, j % a.group) for j in range(a.micro_batch)]
        h, w = latent_grid(self.pipe, *wg.size)
        ids = target_ids(h, w, n_roll, self.device)
        x = wg.states[:n_roll, 0].to(self.device)
        sigma = torch.ones(1, device=self.device)
        out = {}
        for backend in dict.fromkeys(("native", a.attention_backend)):
            try:
                self.set_backend(backend)
                times = {}
                for what in ("rollout_forward_s", "train_step_s"):
                    runs = []
                    for r in range(reps + 1):  # the first run warms up
                        self.sync()
                        t0 = time.time()
                        if what == "rollout_forward_s":
                            with torch.no_grad():
                                velocity(self.transformer, x, ids, wg.ref, wg.ref_ids, sigma, wg.embeds, wg.text_ids)
                        else:
                            self.transformer.train()
                            self.tg._train_micro_batch(cfg, self.accelerator, self.transformer, self.transformer,
                                                       self.pipe, wg, mb, self.adv, sigma_schedule(2, cfg.sampling.shift),
                                                       1, self.device, _stats())
                            self.transformer.eval()
                        self.sync()
                        if r:
                            runs.append(time.time() - t0)
                    times[what] = round(sorted(runs)[len(runs) // 2], 4)
                out[backend] = times
            except Exception as exc:
                out[backend] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                if backend != "native":
                    self.backend_error = out[backend]["error"]
            finally:
                self.transformer.eval()
                self.reset_lora()
        self.set_backend("native")
        self.emit({"attention_probe": out, "rollout_batch": n_roll, "train_micro_batch": a.micro_batch})

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_lora(self):
        with torch.no_grad():
            for p, p0 in zip(self.params, self.initial):
                p.copy_(p0)
                p.grad = None

    def count_flops(self):
        """FLOPs of one rollout forward and of one trained transition (forward + backward, with the
        checkpointing recompute) at the bench's token counts, on the eager model."""
        from torch.utils.flop_counter import FlopCounterMode

        from etchr_rl.model import latent_grid, target_ids, velocity
        from etchr_rl.sde import sigma_schedule

        cfg = self.config(steps=2)
        wg = self.ours_rollout(cfg, names=[])[0][0]
        h, w = latent_grid(self.pipe, *wg.size)
        t = self.transformer
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            velocity(t, wg.states[:1, 0].to(self.device), target_ids(h, w, 1, self.device), wg.ref, wg.ref_ids,
                     torch.ones(1, device=self.device), wg.embeds, wg.text_ids)
        self.fwd_flops = float(fc.get_total_flops())
        t.train()
        with FlopCounterMode(display=False) as fc:
            self.tg._train_micro_batch(cfg, self.accelerator, t, t, self.pipe, wg, [(0, 0, 0, 0)], self.adv,
                                       sigma_schedule(2, cfg.sampling.shift), 1, self.device, _stats())
        t.eval()
        self.train_flops = float(fc.get_total_flops())
        self.reset_lora()
        tokens = {"text": int(wg.embeds.shape[1]), "target": h * w, "reference": int(wg.ref.shape[1])}
        self.emit({"dit_forward_tflop": round(self.fwd_flops / 1e12, 3),
                   "train_transition_tflop": round(self.train_flops / 1e12, 3), "tokens": tokens})

    @property
    def accelerator(self):
        if not hasattr(self, "_accelerator"):
            from accelerate import Accelerator

            self._accelerator = Accelerator(cpu=not self.cuda)
        return self._accelerator

    # ---- the two rollouts
    def ours_rollout(self, cfg, names):
        """RL/train_grpo.py's sample_and_score for one prompt (names=[]: no scoring, for warm-ups)."""
        self.transformer.eval()
        return self.tg.sample_and_score(cfg, self.pipe, self.transformer, [(0, self.prompt, self.source)], 0, 0,
                                        self.bg, self.judge if names else None, names)

    @torch.no_grad()
    def reference_rollout(self, cfg):
        """The reference's loop: one image at a time, each re-encoding the prompt and the reference."""
        from etchr_rl.model import (decode, encode_prompt, encode_reference, latent_grid, output_size,
                                    prepare_source, target_ids, velocity)
        from etchr_rl.rollout import Group, noise_generator
        from etchr_rl.sde import clean_estimate, sde_step, sigma_schedule

        self.transformer.eval()
        s, dev = cfg.sampling, self.device
        sigmas = sigma_schedule(s.steps, s.shift)
        source = prepare_source(self.source.convert("RGB"), cfg.data.resize)
        width, height = output_size(*source.size, cfg.data.resize, cfg.data.max_area, cfg.data.size)
        h, w = latent_grid(self.pipe, width, height)
        channels = self.transformer.config.in_channels
        ids = target_ids(h, w, 1, dev)
        rows, images = [], []
        for j in range(s.group_size):
            embeds, text_ids = encode_prompt(self.pipe, self.prompt.instruction, dev, cfg.model.max_sequence_length)
            ref, ref_ids = encode_reference(self.pipe, source, dev)
            x = torch.randn(h * w, channels, generator=noise_generator(cfg.train.seed, 0, 0, 0, j))[None].to(dev)
            gen = noise_generator(cfg.train.seed, 0, 0, 0, 10_000 + j)
            states, nexts, logps, means = [], [], [], []
            for k in range(s.steps):
                v = velocity(self.transformer, x, ids, ref, ref_ids, torch.tensor([float(sigmas[k])], device=dev),
                             embeds, text_ids)
                states.append(x.cpu())
                if k == s.steps - 1:
                    x = clean_estimate(x, v, float(sigmas[k]))
                    break
                x, lp, mu = sde_step(x, v, sigmas, k, s.eta, torch.randn(h * w, channels, generator=gen)[None].to(dev))
                nexts.append(x.cpu())
                logps.append(lp.cpu())
                means.append(mu.cpu())
            images.extend(decode(self.pipe, x, h, w))
            rows.append([torch.stack(t, 1) for t in (states, nexts, logps, means)])
        states, nexts, logps, means = (torch.cat([r[i] for r in rows]) for i in range(4))
        return Group(prompt_index=0, states=states, next_states=nexts, logps=logps, means=means, images=images,
                     size=(width, height), embeds=embeds, text_ids=text_ids, ref=ref, ref_ids=ref_ids)

    def reference_rewards(self, cfg, group):
        """Every request one at a time: one sample after the other, judge concurrency 1."""
        from etchr_rl import rewards as R

        out = {n: [] for n in self.names}
        for img in group.images:
            inp = R.RewardInput(instruction=self.prompt.instruction, question=self.prompt.question,
                                answer=self.prompt.answer, original=self.source, edited=img, meta=self.prompt.meta)
            for n, vals in self.bg.submit(R.compute_rewards([inp], self.names, self.judge_seq, cfg)).result().items():
                out[n].extend(vals)
        return out

    # ---- training
    def train(self, cfg, groups, record):
        """train_iteration (the real one) with a fresh AdamW from the initial LoRA; records the first
        optimizer step's gradient and the LoRA update."""
        from etchr_rl.sde import sigma_schedule

        params = self.params
        grads = record.setdefault("grads", [])

        class Recording(torch.optim.AdamW):
            def step(self, closure=None):
                if not grads:
                    grads.append(torch.cat([p.grad.detach().float().flatten() for p in params]))
                return super().step(closure)

        opt = Recording(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                        weight_decay=cfg.optim.weight_decay)
        n_train = max(1, int((cfg.sampling.steps - 1) * cfg.sampling.timestep_fraction))
        self.transformer.train()
        stats = self.tg.train_iteration(cfg, self.accelerator, self.transformer, self.transformer, opt, params,
                                        self.pipe, groups, self.adv, sigma_schedule(cfg.sampling.steps, cfg.sampling.shift),
                                        n_train, self.tg.Position(), 0, 0, self.device, _NoBar())
        self.transformer.eval()
        record["update"] = torch.cat([(p.detach() - p0).float().flatten() for p, p0 in zip(params, self.initial)])
        return stats, n_train

    def warm_train(self, cfg, wg):
        """One forward + backward per micro-batch size the timed iteration will use (compiles them)."""
        from etchr_rl.sde import sigma_schedule

        n_train = max(1, int((cfg.sampling.steps - 1) * cfg.sampling.timestep_fraction))
        window = [(0, 0, 0, 0)] * (cfg.train.grad_accum * n_train)
        sizes = sorted({len(b) for b in self.tg._micro_batches(window, cfg.train.micro_batch)})
        self.transformer.train()
        for size in sizes:
            mb = [(0, j % self.a.group, 0, j % self.a.group) for j in range(size)]
            self.tg._train_micro_batch(cfg, self.accelerator, self.transformer, self.transformer, self.pipe, wg, mb,
                                       self.adv, sigma_schedule(2, cfg.sampling.shift), 1, self.device, _stats())
        self.transformer.eval()
        self.reset_lora()
        return sizes

    # ---- one variant
    def run(self, name: str) -> dict:
        a = self.a
        overrides: dict = {}
        if name == "reference":
            micro, chunk, backend, compile = 1, 0, "native", False
        elif name in VARIANTS:
            spec = VARIANTS[name]
            mb, attn, compile = spec.get("micro", True), spec.get("attn", False), spec.get("compile", False)
            overrides = dict(spec.get("overrides", {}))
            micro, chunk = (a.micro_batch if mb else 1), a.rollout_chunk
            backend = a.attention_backend if attn and self.backend_error is None else "native"
        else:
            raise ValueError(f"unknown variant {name!r}; choose from reference, {', '.join(VARIANTS)}")
        if self.compiled and not compile:
            raise RuntimeError("eager variants must come before compiled ones (compilation is permanent)")
        cfg = self.config(micro=micro, chunk=chunk, backend=backend, compile=compile, overrides=overrides)
        warm_cfg = self.config(micro=micro, chunk=chunk, backend=backend, compile=compile, steps=2, overrides=overrides)
        self.reset_lora()
        try:
            return self._run(name, cfg, warm_cfg, micro, chunk, backend, compile, overrides)
        finally:  # the next variant starts from per-block checkpointing (the reference's and the RL default)
            from etchr_rl.fp8 import undo_fp8
            from etchr_rl.model import block_counts, set_checkpointed_blocks

            undo_fp8(self.transformer)  # model.fp8's float8 base layers back to plain Linear
            set_checkpointed_blocks(self.transformer, *block_counts(self.transformer))
            self.reset_lora()

    def _run(self, name, cfg, warm_cfg, micro, chunk, backend, compile, overrides) -> dict:
        a = self.a
        ckpt = None
        if name != "reference":  # the trainer's own choice of checkpointed blocks (train_grpo.py does the same)
            from etchr_rl.model import adamw_state_bytes, configure_checkpointing, planning_image_tokens

            ckpt = configure_checkpointing(
                self.transformer, cfg.model, batch=micro, text_tokens=cfg.model.max_sequence_length,
                image_tokens=planning_image_tokens(cfg.data.resize, cfg.data.max_area, cfg.data.size,
                                                   cfg.model.activation_reference_pixels),
                optimizer_state_bytes=adamw_state_bytes(self.params))
            self.reset_lora()
        self.set_backend(backend)
        if cfg.model.fp8 != "none":  # for this variant only: run() puts plain Linear layers back afterwards
            from etchr_rl.fp8 import apply_fp8

            apply_fp8(self.transformer, cfg.model.fp8)
        if compile and not self.compiled:
            from etchr_rl.model import apply_speed_options

            apply_speed_options(self.transformer, compile=True)
            self.compiled = True
        # warm-up: a 2-step group with the timed batch shapes, then the training micro-batch sizes
        tw = time.time()
        wg = self.reference_rollout(warm_cfg) if name == "reference" else self.ours_rollout(warm_cfg, names=[])[0][0]
        sizes = self.warm_train(cfg, wg)
        self.sync()
        warm_s = time.time() - tw
        del wg
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        # the timed group
        self.sync()
        t0 = time.time()
        if name == "reference":
            group = self.reference_rollout(cfg)
            self.sync()
            t1 = time.time()
            rewards = self.reference_rewards(cfg, group)
        else:
            groups, pending = self.ours_rollout(cfg, self.names)
            group = groups[0]
            self.sync()
            t1 = time.time()
            rewards = self.tg.gather_rewards(pending, self.names)
        t2 = time.time()
        record: dict = {}
        train_groups = [self.reference["group"]] if self.reference is not None else [group]
        stats, n_train = self.train(cfg, train_groups, record)
        self.sync()
        t3 = time.time()
        rollout_s, reward_s, train_s = t1 - t0, t2 - t1, t3 - t2
        seconds, gpu_s = t3 - t0, rollout_s + train_s
        flops = a.group * a.steps * self.fwd_flops + a.group * n_train * self.train_flops
        values = [v for vals in rewards.values() for v in vals]
        row = {"variant": name, "seconds": round(seconds, 3), "rollout_s": round(rollout_s, 3),
               "reward_s": round(reward_s, 3), "train_s": round(train_s, 3), "gpu_seconds": round(gpu_s, 3),
               "warmup_s": round(warm_s, 1), "micro_batch": micro, "micro_batch_sizes": sizes,
               "rollout_chunk": chunk, "attention_backend": backend, "compile": compile, "overrides": overrides,
               "activation_checkpointing": ckpt,
               "tflops": round(flops / gpu_s / 1e12, 2),
               "fraction_of_ceiling": round(flops / gpu_s / 1e12 / self.ceiling, 3) if self.ceiling else None,
               "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if self.cuda else None,
               "rewards_valid": sum(v is not None for v in values) / max(1, len(values)),
               "reward_mean": sum(v for v in values if v is not None) / max(1, sum(v is not None for v in values)),
               "loss": stats["loss"], "ratio_mean": stats["ratio_mean"], "clip_fraction": stats["clip_fraction"],
               "grad_norm": stats["grad_norm"]}
        g0 = record["grads"][0]  # the share of the first step's gradient on lora_A: 0 when B starts at 0
        row["lora_A_grad_share"] = float(g0[self.is_lora_a.to(g0.device)].norm() / g0.norm().clamp_min(1e-30))
        if name == "reference":
            self.reference = {"group": group, "grad": record["grads"][0], "update": record["update"]}
        ref = self.reference
        if ref is not None:
            base = self.results.get("reference")
            if base:
                row["ratio_vs_reference"] = round(base["seconds"] / seconds, 3)
                row["gpu_ratio_vs_reference"] = round(base["gpu_seconds"] / gpu_s, 3)
            elif name == "reference":
                row["ratio_vs_reference"] = row["gpu_ratio_vs_reference"] = 1.0
            rg = ref["group"]
            row["logp_max_abs_diff"] = float((group.logps - rg.logps).abs().max())
            last, ref_last = group.states[:, -1].float(), rg.states[:, -1].float()
            row["last_state_rel_err"] = float((last - ref_last).norm() / ref_last.norm())
            row["grad_rel_err"] = _rel(record["grads"][0], ref["grad"])
            a_mask = self.is_lora_a.to(ref["grad"].device)  # lora_A's part alone (small while B is small)
            row["grad_rel_err_lora_A"] = _rel(record["grads"][0][a_mask], ref["grad"][a_mask])
            row["lora_update_rel_err"] = _rel(record["update"], ref["update"])
        if name in VARIANTS and VARIANTS[name].get("attn") and self.backend_error is not None:
            row["attention_backend_fallback"] = f"{a.attention_backend} failed in the probe: {self.backend_error}"
        if compile:
            from torch._dynamo.utils import counters

            row["graph_breaks"] = int(sum(counters["graph_break"].values()))
        del group
        self.results[name] = row
        return row

    def close(self):
        for judge in (self.judge, self.judge_seq):
            self.bg.submit(judge.aclose()).result()
        self.bg.close()
        self.stub.close()


class _NoBar:
    def update(self, n):
        pass


def _stats() -> dict:
    return {"ratios": [], "clipped": [], "losses": [], "kls": [], "grad_norms": []}


def _rel(x, ref) -> float:
    n = float(ref.norm())
    return float((x - ref).norm()) / n if n > 0 else float((x - ref).norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="reference,ours_full",
                    help=f"comma-separated, eager before compiled: reference, {', '.join(VARIANTS)}")
    ap.add_argument("--group", type=int, default=8, help="G samples")
    ap.add_argument("--steps", type=int, default=25, help="SDE steps")
    ap.add_argument("--trained-steps", type=int, default=14, help="transitions trained per sample")
    ap.add_argument("--size", type=int, default=720, help="square side in pixels")
    ap.add_argument("--grad-accum", type=int, default=4, help="samples per optimizer step")
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--latency", type=float, default=1.0, help="seconds the stub judge takes per request")
    ap.add_argument("--lora-b-std", type=float, default=1e-3,
                    help="start LoRA B from N(0, std) instead of peft's zeros, so the first step's gradient check "
                         "covers lora_A too (with B = 0 those gradients are 0 and a wrong path through them is "
                         "invisible: docs/PERFORMANCE.md, 'Compiled backward'); 0 = peft's init")
    ap.add_argument("--micro-batch", type=int, default=4, help="train.micro_batch of the ours_* variants")
    ap.add_argument("--rollout-chunk", type=int, default=4, help="sampling.rollout_chunk of the ours_* variants")
    # native: on H200 + torch 2.11 the cuDNN kernel's backward crashed the process (docs/PERFORMANCE.md)
    ap.add_argument("--attention-backend", default="native", help="model.attention_backend of ours_attn/compile")
    ap.add_argument("--define", action="append", default=[], metavar="NAME=key=value,...",
                    help="add (or replace) a micro-batched variant with RL config overrides, e.g. "
                         "ours_fp8x=model.fp8=float8_rowwise,model.activation_budget_gib=76 (model.compile=true compiles)")
    ap.add_argument("--time-budget", type=float, default=480.0,
                    help="seconds; variants that would start later are skipped (reported), not run")
    ap.add_argument("--tiny", action="store_true", help="the tiny twin on CPU in fp32 (smoke test)")
    ap.add_argument("--tiny-models", default=None, help="folder of a scripts/make_tiny_models.py build (--tiny)")
    ap.add_argument("--out", default=None, help="append one JSON object per line")
    a = ap.parse_args(argv)
    if a.tiny:
        a.size = a.size if a.size != 720 else 64
        a.lora_rank = a.lora_rank if a.lora_rank != 64 else 4
        if a.attention_backend in ("native", "_native_cudnn"):
            a.attention_backend = "_native_math"
    elif not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU, or pass --tiny for the CPU smoke test")
    if a.group % a.grad_accum or not 1 <= a.trained_steps <= a.steps - 1:
        ap.error("--group must be a multiple of --grad-accum and 1 <= --trained-steps <= --steps - 1")
    try:
        for d in a.define:
            name, spec = parse_define(d)
            VARIANTS[name] = spec
    except ValueError as exc:
        ap.error(str(exc))
    variants = a.variant_list = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v != "reference" and v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from reference, {', '.join(VARIANTS)}")
    start = time.time()

    def emit(obj):
        print(json.dumps(obj), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(obj) + "\n")

    import diffusers

    emit({"header": {"bench": "bench_rl_group", "card": torch.cuda.get_device_name() if not a.tiny else "cpu (tiny)",
                     "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "date": datetime.date.today().isoformat(), "group": a.group, "steps": a.steps,
                     "trained_steps": a.trained_steps, "size": a.size, "grad_accum": a.grad_accum,
                     "lora_rank": a.lora_rank, "latency_s": a.latency, "micro_batch": a.micro_batch,
                     "rollout_chunk": a.rollout_chunk, "attention_backend": a.attention_backend,
                     "variants": variants,
                     "method": "ONE timed group per variant after a warm-up (a 2-step group with the same "
                               "shapes + one training forward/backward per micro-batch size); gradient "
                               "checkpointing on; training on the reference's trajectories with fixed advantages"}})
    bench = Bench(a, emit)
    try:
        bench.setup()
    except Exception as exc:
        emit({"error": f"setup: {type(exc).__name__}: {str(exc)[:500]}", "traceback": traceback.format_exc()[-2000:]})
        return 1
    failed = 0
    try:
        for name in variants:
            elapsed = time.time() - start
            if elapsed > a.time_budget:
                emit({"variant": name, "error": f"skipped: {elapsed:.0f} s elapsed > --time-budget {a.time_budget:g}"})
                failed += 1
                continue
            try:
                emit(bench.run(name))
            except Exception as exc:  # one failing variant must not lose the others' numbers
                failed += 1
                emit({"variant": name, "error": f"{type(exc).__name__}: {str(exc)[:500]}",
                      "traceback": traceback.format_exc()[-2000:]})
            finally:
                gc.collect()
                if bench.cuda:
                    torch.cuda.empty_cache()
    finally:
        bench.close()
    emit({"done_s": round(time.time() - start, 1), "failed_variants": failed})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
