#!/usr/bin/env python
"""SFT (Reasoning Imitation) of FLUX.2-klein as a question-conditioned editor: LoRA or full fine-tuning.

    python SFT/train_sft.py --config configs/sft/tiny_demo.yaml [key=value ...]
    python SFT/train_sft.py --config ... --print-config     # the resolved config, then exit (-h: every key)
    accelerate launch --config_file configs/accelerate/ddp.yaml SFT/train_sft.py --config ...
    NGPU=8 bash scripts/sft/train.sh --config configs/sft/klein9b_lora_r768.yaml

The objective is PROTOCOL.md section 1 (etchr_sft.objective). Checkpoints (LoRA in diffusers naming
with alpha, meta.json, optimizer / scheduler / RNG / data position) go to run_dir/checkpoints and a
rerun resumes from the latest one (train.resume=auto).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from etchr_sft import runtime  # noqa: E402
from etchr_sft.checkpoint import (CheckpointError, export_fsdp, finalize, latest_checkpoint,  # noqa: E402
                                  load_training_state, meta, repair_checkpoints, save_training_state, step_dir)
from etchr_sft.config import (ConfigError, check_compiled_backward, load_sft_config, save_config,  # noqa: E402
                              split_cli, to_container)
from etchr_sft.data import (BatchDataset, DataError, bucket_key, largest_sample_tokens, make_batches,  # noqa: E402
                            read_csv, shard)
from etchr_sft.fp8 import apply_fp8, check_fp8  # noqa: E402
from etchr_sft.lora import LORA_FILE, save_lora  # noqa: E402
from etchr_sft.model import (DTYPES, TensorCache, adamw_state_bytes, add_lora, apply_speed_options,  # noqa: E402
                             configure_checkpointing, encode_images, encode_prompts, load_pipeline,
                             lora_target_names, pack, pack_reference, velocity)
from etchr_sft.objective import lookup, make_schedule, noisy_input, sample_generator, weighted_mse  # noqa: E402
from etchr_sft.plots import compose_panel, stack, write_curves  # noqa: E402
from etchr_sft.precompute import PrecomputedDataset, PrecomputedStore, model_fingerprint  # noqa: E402

log = runtime.get_logger("etchr_sft")


class Position:
    """Where training stands; saved with every checkpoint (training_state/state.json)."""

    def __init__(self):
        self.step, self.epoch, self.cursor = 0, 0, 0  # optimizer steps, epochs, micro-batches into the epoch

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.cursor = int(state["step"]), int(state["epoch"]), int(state["cursor"])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        from etchr_sft.config import SFTConfig, config_help

        print(config_help(SFTConfig, __doc__))
        return 0
    print_config = "--print-config" in argv
    try:
        config_path, overrides = split_cli([a for a in argv if a != "--print-config"])
        cfg = load_sft_config(config_path, overrides)
        if print_config:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg, resolve=True), end="")
            return 0
        train(cfg)
    except (ConfigError, DataError, FileNotFoundError, CheckpointError, runtime.RunDirLocked) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def train(cfg, pipe=None) -> dict:
    """Run SFT as `cfg` says. `pipe`: an already built pipeline to train instead of loading
    model.pretrained_path (scripts/bench/bench_sft_step.py passes its in-memory 9B-shape one).
    Rank 0 holds run_dir/.lock for the whole run: a second trainer there stops (RunDirLocked)."""
    if runtime.launched():
        runtime.die_with_parent()  # a killed launcher must not leave workers writing the run dir
    lock = runtime.RunDirLock(cfg.train.run_dir).acquire() if runtime.is_main() else None
    try:
        return _train(cfg, pipe)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg, pipe=None) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    # ================================================================ build
    cuda = torch.cuda.is_available()
    _check_sharding_backend(cuda, cfg)
    check_fp8(cfg.model.fp8, lora_enabled=cfg.lora.enabled)  # no torchao / CUDA / fp8 GPU: stop before loading
    check_compiled_backward(cfg.model, "cuda" if cuda else "cpu")  # wrong gradients measured on CUDA
    accelerator = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum, cpu=not cuda,
                              mixed_precision=cfg.train.mixed_precision if cuda else "no")
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(cfg.train.seed)
    run_dir = Path(cfg.train.run_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir)
        for line in repair_checkpoints(run_dir):  # leftovers of a killed save; `latest` = newest complete
            runtime.print0(f"[sft] checkpoints: {line}")
    device = accelerator.device

    if pipe is None:
        pipe = load_pipeline(cfg.model.pretrained_path, DTYPES[cfg.model.dtype])
    precomputed = bool(cfg.data.precomputed_dir)  # conditioning read from disk: the encoders stay on the CPU
    fingerprint = model_fingerprint(pipe) if precomputed else None  # of the encoders as loaded, before any move
    if not precomputed:
        pipe.vae.to(device)
        pipe.text_encoder.to(device)
    transformer = pipe.transformer
    lora_info = None
    if cfg.lora.enabled:
        transformer.requires_grad_(False)
        targets = lora_target_names(transformer, list(cfg.lora.targets), cfg.lora.single_blocks_to_out)
        add_lora(transformer, cfg.lora.rank, cfg.lora.alpha, targets, cfg.lora.dropout)
        lora_info = {"rank": cfg.lora.rank, "alpha": float(cfg.lora.alpha), "targets": targets}
    else:
        transformer.requires_grad_(True)
    fp8_layers = apply_fp8(transformer, cfg.model.fp8)  # frozen LoRA base layers -> torchao float8 (model.fp8)
    if fp8_layers:
        runtime.print0(f"[sft] model.fp8={cfg.model.fp8}: {len(fp8_layers)} frozen base layers run float8 matmuls")
    params = [p for p in transformer.parameters() if p.requires_grad]
    if _budget_mode(cfg.model):
        transformer.to(device)  # the probe measures on the device (accelerator.prepare would move it anyway)
    rows = read_csv(cfg.data.csv, cfg.data.base_path)
    keys = [bucket_key(r, cfg.data.max_pixels, cfg.data.multiple_of, cfg.data.reference_resize) for r in rows]
    # Which blocks are checkpointed (issue #17): all / none / pinned, or as many as model.activation_budget_gib
    # needs, probed at the data's largest sample (its bucket's target + reference tokens) at the full batch,
    # so no batch of this CSV exceeds the plan (a 512^2 set is not planned as if it held 1024^2 references).
    probe_tokens, probe_key = largest_sample_tokens(keys)
    ckpt = configure_checkpointing(transformer, cfg.model, batch=cfg.train.batch_size, image_tokens=probe_tokens,
                                   text_tokens=cfg.model.max_sequence_length,
                                   optimizer_state_bytes=adamw_state_bytes(params))
    if ckpt["mode"] == "budget":
        ckpt["probe"]["largest_bucket"] = f"target {probe_key[0]}x{probe_key[1]} + reference {probe_key[2]}x{probe_key[3]}"
    runtime.print0(f"[sft] activation checkpointing: {ckpt}")
    speed = apply_speed_options(transformer, cfg.model)
    speed += [f"fp8={cfg.model.fp8} ({len(fp8_layers)} layers)"] if fp8_layers else []
    fused = {"fused": True} if cfg.optim.fused and device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay, **fused)

    store = PrecomputedStore(cfg.data.precomputed_dir, rows, cfg, fingerprint) if precomputed else None
    if store is not None:
        runtime.print0(f"[sft] precomputed conditioning: {len(set(store.shard_of))} shard(s) in "
                       f"{cfg.data.precomputed_dir}; text encoder and VAE not run for training")
    batches_per_epoch = len(shard(make_batches(keys, cfg.train.batch_size, cfg.train.seed, 0, cfg.data.aspect_buckets),
                                  rank, world))
    steps_per_epoch = max(1, batches_per_epoch // cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    schedule_name = "constant_with_warmup" if cfg.optim.schedule == "constant" else "cosine"
    lr_scheduler = get_scheduler(schedule_name, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                                 num_training_steps=total_steps)
    # The LR scheduler is stepped by hand, once per optimizer step, whatever the world size.
    _fill_deepspeed_config(accelerator, cfg)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    if accelerator.distributed_type == "FSDP":  # fully_shard replaced the parameters with sharded DTensors
        params = [p for p in transformer.parameters() if p.requires_grad]
    position = Position()

    n_trainable = sum(p.numel() for p in params)
    runtime.print0(
        f"[sft] {len(rows)} samples, {world} process(es) x batch {cfg.train.batch_size} x accumulation "
        f"{cfg.train.grad_accum} = {cfg.train.batch_size * cfg.train.grad_accum * world} samples per optimizer "
        f"step; {steps_per_epoch} steps/epoch; {total_steps} steps; "
        f"{'LoRA r%d alpha %g on %d layers' % (cfg.lora.rank, cfg.lora.alpha, len(lora_info['targets'])) if lora_info else 'full fine-tuning'}"
        f"; {n_trainable / 1e6:.3f} M trainable parameters"
        f"{'; speed: ' + ', '.join(speed + (['fused AdamW'] if fused else [])) if speed or fused else ''}")

    resume_from = None
    if cfg.train.resume == "auto":
        resume_from = latest_checkpoint(run_dir)
    elif cfg.train.resume != "never":
        resume_from = Path(cfg.train.resume)
    if resume_from is not None:
        saved = load_training_state(resume_from / "training_state", accelerator, transformer, optimizer, lr_scheduler,
                                    lora=bool(lora_info),
                                    deepspeed_kwargs=_deepspeed_lora_kwargs(accelerator, "load", lora_info))
        position.load_state_dict(saved)
        runtime.print0(f"[sft] resumed from {resume_from} at step {position.step} (epoch {position.epoch}, "
                       f"batch {position.cursor})")

    schedule = make_schedule()
    text_cache = TensorCache(str(run_dir / "cache" / "text") if cfg.data.cache_text_embeddings else None)
    ref_cache = TensorCache(str(run_dir / "cache" / "reference") if cfg.data.cache_reference_latents else None)
    metrics = runtime.MetricsWriter(run_dir, wandb_enabled=cfg.wandb, wandb_project=cfg.wandb_project,
                                    config=to_container(cfg), resume_step=position.step)  # rows past it: superseded
    if ckpt["mode"] in ("budget", "pinned"):  # the default modes add no row (metrics.jsonl stays one row per log)
        metrics.log({"activation_checkpointing": ckpt}, step=position.step)

    def compute_loss(batch: dict) -> torch.Tensor:
        index = batch["index"].tolist()
        if precomputed:  # the loader read them from data.precomputed_dir (etchr_sft.precompute)
            embeds, text_ids = batch["prompt_embeds"].to(device), batch["text_ids"].to(device)
            x0, ref = batch["target"].to(device), batch["reference"].to(device)
        else:
            embeds, text_ids = _cached_prompts(pipe, batch["prompt"], device, cfg.model.max_sequence_length,
                                               text_cache)
            x0 = encode_images(pipe, batch["target"])  # (B, C, h, w)
            ref = _cached_references(pipe, batch, rows, ref_cache)
        x0_tok, x_ids = pack(x0.float())
        ref_tok, ref_ids = pack_reference(ref)
        # Per-sample timestep and noise from (seed, epoch, sample): independent of rank and world size.
        gens = [sample_generator(cfg.train.seed, position.epoch, i) for i in index]
        idx = torch.stack([torch.randint(0, len(schedule.sigmas), (1,), generator=g)[0] for g in gens])
        eps = torch.stack([torch.randn(x0_tok.shape[1:], generator=g, dtype=torch.float32) for g in gens]).to(device)
        sigma, t, w = lookup(schedule, idx, cfg.train.timestep_lookup)
        x_t, target = noisy_input(x0_tok, eps, sigma.float().to(device))
        v = velocity(transformer, x_t, x_ids, ref_tok, ref_ids, t.float().to(device), embeds, text_ids)
        return weighted_mse(v, target, w.float().to(device))

    # ================================================================ loop
    t_start, t_step = time.time(), time.time()
    curves_at = None  # time of the last curves.png redraw
    loss_acc, micro = 0.0, 0
    bar = runtime.progress(total=total_steps, desc="sft", unit="step", initial=position.step)
    transformer.train()
    timed_out = False
    while position.step < total_steps and not timed_out:
        epoch_batches = shard(make_batches(keys, cfg.train.batch_size, cfg.train.seed, position.epoch,
                                           cfg.data.aspect_buckets), rank, world)
        if store is not None:
            dataset = PrecomputedDataset(store, epoch_batches[position.cursor:])
        else:
            dataset = BatchDataset(rows, epoch_batches[position.cursor:], max_pixels=cfg.data.max_pixels,
                                   multiple_of=cfg.data.multiple_of, reference_resize=cfg.data.reference_resize)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False,
                                             num_workers=cfg.data.num_workers, persistent_workers=False)
        for batch in loader:
            with accelerator.accumulate(transformer):
                loss = compute_loss(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {position.step} "
                                             f"(samples {batch['index'].tolist()})")
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    if cfg.optim.grad_clip > 0:
                        grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.grad_clip)
                    else:
                        grad_norm = torch.norm(torch.stack([p.grad.detach().norm() for p in params if p.grad is not None]))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            position.cursor += 1
            loss_acc += loss.detach().float().item()
            micro += 1
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            position.step += 1
            mean_loss = accelerator.reduce(torch.tensor(loss_acc / micro, device=device), "mean").item()
            loss_acc, micro = 0.0, 0
            now = time.time()
            timed_out = _out_of_time(accelerator, cfg.train.time_limit_s, now - t_start, device)
            last = position.step == total_steps or timed_out
            if ckpt["mode"] == "budget" and "measured_peak_gib" not in ckpt and (position.step >= 2 or last):
                # the plan against the run: step 2 is the first with the optimizer state resident all along
                ckpt["measured_peak_gib"] = _peak_memory(accelerator, device)["max_memory_allocated_gib"]
                runtime.print0(f"[sft] activation budget {ckpt['budget_gib']} GiB: predicted peak "
                               f"{ckpt['predicted_peak_gib']} GiB, measured {ckpt['measured_peak_gib']} GiB "
                               f"(steps 1-{position.step})")
                metrics.log({"activation_checkpointing": ckpt}, step=position.step)
            if position.step % cfg.train.log_every == 0 or last:
                metrics.log({"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0],
                             "grad_norm": float(grad_norm) if grad_norm is not None else None,
                             "step_time_s": round(now - t_step, 4), "epoch": position.epoch,
                             **_peak_memory(accelerator, device)}, step=position.step)
                if accelerator.is_main_process and (last or curves_at is None
                                                    or now - curves_at >= cfg.train.curves_every_s):
                    write_curves(run_dir)  # run_dir/curves.png: loss, lr, grad norm so far (resume included)
                    curves_at = now
            t_step = now
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            if position.step % cfg.train.checkpoint_every == 0 or (last and cfg.train.save_final):
                save_checkpoint(accelerator, transformer, optimizer, lr_scheduler, cfg, position, lora_info)
            if cfg.train.validate_every and (position.step % cfg.train.validate_every == 0 or last):
                validate(accelerator, pipe, transformer, cfg, rows, position.step, metrics)
            if last:
                break
        else:
            position.epoch += 1
            position.cursor = 0
    bar.close()
    metrics.close()
    accelerator.wait_for_everyone()
    stop = f" (train.time_limit_s={cfg.train.time_limit_s:g} reached)" if timed_out else ""
    runtime.print0(f"[sft] done: {position.step} steps in {time.time() - t_start:.1f} s{stop}; checkpoints in "
                   f"{run_dir / 'checkpoints'}")
    accelerator.end_training()
    return {"step": position.step, "timed_out": timed_out, "transformer": accelerator.unwrap_model(transformer),
            "activation_checkpointing": ckpt}


# ================================================================ time limit, DeepSpeed, FSDP, memory
def _check_sharding_backend(cuda: bool, cfg) -> None:
    """An accelerate config asking for FSDP or DeepSpeed stops here, before any work, where it cannot apply
    (accelerate would otherwise fall back to plain DDP on CPU without a word)."""
    from accelerate.utils import parse_flag_from_env

    wanted = ("FSDP" if parse_flag_from_env("ACCELERATE_USE_FSDP") else
              "DeepSpeed" if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") else None)
    if wanted is None:
        return
    source = os.environ.get("ACCELERATE_CONFIG") or "the accelerate config (accelerate launch --config_file)"
    if not cuda:
        raise ConfigError(f"{source} asks for {wanted}, which shards the model over CUDA GPUs; this machine has no "
                          "CUDA device, so it would silently train as plain DDP. Use "
                          "ACCELERATE_CONFIG=configs/accelerate/ddp.yaml on CPU.")
    if wanted == "FSDP" and cfg.train.validate_every and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"{source} asks for FSDP over {os.environ['WORLD_SIZE']} processes and "
                          f"train.validate_every={cfg.train.validate_every}: validation runs on rank 0 alone, which "
                          "cannot run a sharded model; set train.validate_every=0 (validate the exported checkpoint).")


def _budget_mode(model_cfg) -> bool:
    b = model_cfg.activation_budget_gib
    return model_cfg.checkpoint_blocks is None and not (isinstance(b, (int, float)) and float(b) == 0)


def _out_of_time(accelerator, limit_s: float, elapsed_s: float, device) -> bool:
    """train.time_limit_s reached? Rank 0's clock decides for all ranks (no rank may stop alone)."""
    if limit_s <= 0:
        return False
    if accelerator.num_processes == 1:
        return elapsed_s >= limit_s
    from accelerate.utils import broadcast

    flag = torch.tensor([1.0 if elapsed_s >= limit_s else 0.0], device=device)
    return bool(broadcast(flag, from_process=0).item() > 0)


def _fill_deepspeed_config(accelerator, cfg) -> None:
    """Under DeepSpeed, accelerate reads the micro-batch size from a prepared DataLoader; SFT prepares none
    (each rank builds its own), so set it from the config, and keep the config's accumulation (accelerate
    launch otherwise imposes the accelerate YAML's value)."""
    ds = accelerator.state.deepspeed_plugin if accelerator.distributed_type == "DEEPSPEED" else None
    if ds is None:
        return
    ds.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    ds.deepspeed_config["gradient_accumulation_steps"] = cfg.train.grad_accum
    accelerator.gradient_accumulation_steps = cfg.train.grad_accum


def _deepspeed_lora_kwargs(accelerator, what: str, lora_info) -> dict:
    """LoRA under DeepSpeed: the engine's checkpoint leaves the frozen 9 B base weights out (and loads
    without them); the LoRA weights, optimizer and scheduler states are still saved and restored."""
    if not lora_info or accelerator.distributed_type != "DEEPSPEED":
        return {}
    return {"exclude_frozen_parameters": True} if what == "save" else {"load_module_strict": False}


def _peak_memory(accelerator, device) -> dict:
    """Peak CUDA memory (GiB) of every rank since the start, for the metrics row (empty on CPU)."""
    if device.type != "cuda":
        return {}
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2 ** 30], device=device)
    return {"max_memory_allocated_gib": [round(float(x), 2) for x in accelerator.gather(peak).tolist()]}


# ================================================================ save
def save_checkpoint(accelerator, transformer, optimizer, lr_scheduler, cfg, position: Position, lora_info) -> Path:
    final = step_dir(cfg.train.run_dir, position.step)
    tmp = final.parent / f".{final.name}.tmp"
    if accelerator.is_main_process and tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    save_training_state(tmp / "training_state", accelerator, transformer, optimizer, lr_scheduler,
                        position.state_dict(), lora=bool(lora_info),
                        deepspeed_kwargs=_deepspeed_lora_kwargs(accelerator, "save", lora_info))
    fsdp = accelerator.distributed_type == "FSDP"
    if fsdp:  # whole tensors gathered from the shards (a collective), written by rank 0 in the same layout
        export_fsdp(accelerator.unwrap_model(transformer), tmp, lora_info, accelerator.process_index)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(transformer)
        if lora_info and not fsdp:
            save_lora(model, tmp, lora_info["rank"], lora_info["alpha"], lora_info["targets"])
        elif not fsdp:
            model.save_pretrained(tmp / "transformer")
        finalize(tmp, final, meta(kind="lora" if lora_info else "full", step=position.step,
                                  base_model=cfg.model.pretrained_path, config=to_container(cfg), lora=lora_info),
                 cfg.train.keep_last)
    accelerator.wait_for_everyone()
    return final


@torch.no_grad()
def validate(accelerator, pipe, transformer, cfg, rows, step: int, metrics) -> None:
    """Edit the first `validation_items` rows with a fixed seed; PNGs in run_dir/validation/step-N."""
    if not accelerator.is_main_process or cfg.train.validation_items <= 0:
        accelerator.wait_for_everyone()
        return
    from etchr_sft.data import reference_size, target_size
    from etchr_sft.images import open_rgb8

    model = accelerator.unwrap_model(transformer)
    model.eval()
    parked = bool(cfg.data.precomputed_dir)  # the encoders wait on the CPU; on the device for these edits only
    if parked:
        pipe.vae.to(accelerator.device)
        pipe.text_encoder.to(accelerator.device)
    out_dir = Path(cfg.train.run_dir) / "validation" / f"step-{step:06d}"
    out_dir.mkdir(parents=True, exist_ok=True)
    images, panels = [], []
    for i, row in enumerate(rows[: cfg.train.validation_items]):
        ref = open_rgb8(row.reference, f"validation row {i}: {row.reference}")  # the image rule, as in training
        w, h = target_size(*row.size, cfg.data.max_pixels, cfg.data.multiple_of)
        edit = pipe(image=ref, prompt=row.prompt, height=h, width=w, num_inference_steps=cfg.train.validation_steps,
                    guidance_scale=cfg.train.validation_guidance,
                    generator=torch.Generator(device=pipe.vae.device).manual_seed(cfg.train.seed + i),
                    max_sequence_length=cfg.model.max_sequence_length).images[0]
        edit.save(out_dir / f"{i:03d}.png")
        images.append(edit)
        panels.append(compose_panel(ref, [edit], row.prompt))
    stack(panels).save(out_dir.parent / f"panel-step-{step:06d}.png")  # source | edit, prompt beneath; a row per item
    if parked:
        pipe.vae.to("cpu")
        pipe.text_encoder.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    model.train()
    if metrics._wandb is not None:
        import wandb

        metrics._wandb.log({"validation": [wandb.Image(im) for im in images]}, step=step)
    accelerator.wait_for_everyone()


def _cached_prompts(pipe, prompts, device, max_len, cache: TensorCache):
    if cache.root is None:
        return encode_prompts(pipe, prompts, device, max_len)
    embeds, ids = [], []
    for p in prompts:
        key = TensorCache.key("text", p, max_len)
        hit = cache.get(key)
        if hit is None:
            hit = tuple(t[0].cpu() for t in encode_prompts(pipe, [p], device, max_len))
            cache.put(key, hit)
        embeds.append(hit[0])
        ids.append(hit[1])
    return torch.stack(embeds).to(device), torch.stack(ids).to(device)


def _cached_references(pipe, batch, rows, cache: TensorCache):
    if cache.root is None:
        return encode_images(pipe, batch["reference"])
    out = []
    for j, i in enumerate(batch["index"].tolist()):
        ref = batch["reference"][j: j + 1]
        key = TensorCache.key("ref", rows[i].reference, tuple(ref.shape), os.path.getmtime(rows[i].reference))
        hit = cache.get(key)
        if hit is None:
            hit = encode_images(pipe, ref)[0].cpu()
            cache.put(key, hit)
        out.append(hit)
    return torch.stack(out).to(pipe.vae.device)


if __name__ == "__main__":
    sys.exit(main())
