#!/usr/bin/env python
"""Flow-GRPO for the FLUX.2-klein editor with MLLM-judge and rule-based rewards (PROTOCOL.md 2).

    python RL/train_grpo.py --config configs/rl/tiny_demo.yaml [key=value ...]
    python RL/train_grpo.py --config ... --print-config     # the resolved config, then exit (-h: every key)
    torchrun --nproc_per_node 8 RL/train_grpo.py --config configs/rl/klein9b_grpo.yaml
    NGPU=8 bash scripts/rl/train.sh --config configs/rl/klein9b_grpo.yaml

Per iteration and rank: sample `prompts_per_step` groups of G SDE trajectories (the judge scores
group k while group k+1 is sampled; with sampling.rollout_chunk, chunk i while chunk i+1 is sampled),
compute rewards (None = no signal), group-normalised advantages with GDPO across ranks, then the
clipped-ratio loss on `int((S-1) * timestep_fraction)` random transitions per sample, `grad_accum`
samples per optimizer step (train.micro_batch transitions per forward). Speed switches, all off by
default: model.compile, model.attention_backend, sampling.rollout_chunk, train.micro_batch.
Checkpoints at iteration ends: LoRA (diffusers naming, alpha), optimizer, RNG, step; a rerun resumes
exactly.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from etchr_rl import runtime  # noqa: E402
from etchr_rl.advantages import combine, dist_gather, gdpo, zero_variance_fraction  # noqa: E402
from etchr_rl.checkpoint import (finalize, latest_checkpoint, load_training_state, meta,  # noqa: E402
                                 repair_checkpoints, save_training_state, step_dir)
from etchr_rl.config import ConfigError, load_rl_config, save_config, split_cli, to_container  # noqa: E402
from etchr_rl.fp8 import apply_fp8, check_fp8  # noqa: E402
from etchr_rl.lora import save_lora  # noqa: E402
from etchr_rl.model import (DTYPES, adamw_state_bytes, add_lora, apply_speed_options,  # noqa: E402
                            configure_checkpointing, load_pipeline, lora_target_names, planning_image_tokens,
                            velocity)
from etchr_rl.plots import compose_panel, stack, write_curves  # noqa: E402
from etchr_rl.rollout import noise_generator, sample_group  # noqa: E402
from etchr_rl.sde import clipped_loss, log_prob, ratio, sde_mean, sigma_schedule, step_noise_scale  # noqa: E402

log = runtime.get_logger("etchr_rl")
JUDGED = {"guidance", "correctness"}  # rewards that call the MLLM judge


class Position:
    """Where training stands; saved with every checkpoint (training_state/state.json)."""

    def __init__(self):
        self.step, self.iteration = 0, 0  # optimizer steps; rollout/train iterations done
        self.judge_totals: dict | None = None  # JudgeClient.totals() at the last iteration's end (judge/total_*)

    def state_dict(self) -> dict:
        state = {"step": self.step, "iteration": self.iteration}
        if self.judge_totals is not None:
            state["judge_totals"] = dict(self.judge_totals)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step, self.iteration = int(state["step"]), int(state["iteration"])
        self.judge_totals = state.get("judge_totals")


class BackgroundLoop:
    """An asyncio loop in a thread: judge requests run while the GPU samples the next group."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="etchr-judge")
        self.thread.start()

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def main(argv=None) -> int:
    from etchr_rl.judge import JudgeUnreachable
    from etchr_rl.rewards import RewardFailure

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        from etchr_rl.config import RLConfig, config_help

        print(config_help(RLConfig, __doc__))
        return 0
    print_config = "--print-config" in argv
    try:
        config_path, overrides = split_cli([a for a in argv if a != "--print-config"])
        cfg = load_rl_config(config_path, overrides)
        if print_config:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg, resolve=True), end="")
            return 0
        train(cfg)
    except RewardFailure as exc:
        print(f"aborted: {exc}", file=sys.stderr)
        return 3
    except (ConfigError, FileNotFoundError, ValueError, JudgeUnreachable, runtime.RunDirLocked) as exc:
        # ValueError includes CheckpointError: a training_state that is not ours / was altered
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def train(cfg) -> dict:
    """Run GRPO as `cfg` says. Rank 0 holds run_dir/.lock for the whole run: a second trainer there stops
    (RunDirLocked)."""
    if runtime.launched():
        runtime.die_with_parent()  # a killed launcher must not leave workers writing the run dir
    lock = runtime.RunDirLock(cfg.train.run_dir).acquire() if runtime.is_main() else None
    try:
        return _train(cfg)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from etchr_rl import rewards as R
    from etchr_rl.data import read_jsonl
    from etchr_rl.judge import JudgeClient

    # ================================================================ build
    cuda = torch.cuda.is_available()
    check_fp8(cfg.model.fp8)  # no torchao / CUDA / fp8 GPU: stop before the run dir, the judge and the weights
    accelerator = Accelerator(cpu=not cuda)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    set_seed(cfg.train.seed)
    s = cfg.sampling
    G, S = s.group_size, s.steps
    n_train = max(1, int((S - 1) * s.timestep_fraction))  # 24 * 0.6 -> 14 (PROTOCOL.md 2)
    samples_per_iter = cfg.train.prompts_per_step * G
    if samples_per_iter % cfg.train.grad_accum:
        raise ConfigError(f"prompts_per_step * group_size = {samples_per_iter} is not a multiple of "
                          f"train.grad_accum = {cfg.train.grad_accum}")
    steps_per_iter = samples_per_iter // cfg.train.grad_accum
    run_dir = Path(cfg.train.run_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir)
        for line in repair_checkpoints(run_dir):  # leftovers of a killed save; `latest` = newest complete
            runtime.print0(f"[rl] checkpoints: {line}")

    prompts = read_jsonl(cfg.data.jsonl, cfg.data.root)
    plugins = R.load_plugins(list(cfg.reward.plugins))  # registered before the name check; errors name the entry
    names = list(cfg.reward.weights)
    unknown = [n for n in names if n not in R.REWARDS]
    if unknown:
        raise ConfigError(f"reward.weights names unknown reward(s) {unknown}; known: {sorted(R.REWARDS)}")
    if plugins:  # a plugin that raises or returns the wrong length stops here, before any GPU work
        source = _load_source(prompts[0])
        R.probe_plugins(plugins, [R.RewardInput(instruction=prompts[0].instruction, question=prompts[0].question,
                                                answer=prompts[0].answer, original=source, edited=source.copy(),
                                                meta=prompts[0].meta) for _ in range(3)], cfg)
        unused = [p.name for p in plugins if p.name not in names]
        if unused:
            runtime.print0(f"[rl] reward plugin(s) {unused} loaded but not weighted in reward.weights: not used")
    if "correctness" in names:
        R.check_routable([p.instruction for p in prompts])  # a clear error before any GPU work
    judge = None
    bg = BackgroundLoop()
    if JUDGED & set(names) or any(R.get_reward(n).needs_judge for n in names):
        judge = JudgeClient.from_config(cfg.judge)
        bg.submit(judge.check_reachable()).result()

    pipe = load_pipeline(cfg.model.pretrained_path, DTYPES[cfg.model.dtype])
    pipe.vae.to(device)
    pipe.text_encoder.to(device)
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    targets = lora_target_names(transformer, list(cfg.lora.targets))
    add_lora(transformer, cfg.lora.rank, cfg.lora.alpha, targets)
    fp8_layers = apply_fp8(transformer, cfg.model.fp8)  # frozen LoRA base layers -> torchao float8 (model.fp8)
    if fp8_layers:
        runtime.print0(f"[rl] model.fp8={cfg.model.fp8}: {len(fp8_layers)} frozen base layers run float8 matmuls")
    lora_info = {"rank": cfg.lora.rank, "alpha": float(cfg.lora.alpha), "targets": targets}
    transformer.to(device)
    params = [p for p in transformer.parameters() if p.requires_grad]
    # Which blocks are checkpointed in training (issue #17): all / none / pinned, or as many as
    # model.activation_budget_gib needs, probed at the largest training shape.
    ckpt = configure_checkpointing(
        transformer, cfg.model, batch=cfg.train.micro_batch, text_tokens=cfg.model.max_sequence_length,
        image_tokens=planning_image_tokens(cfg.data.resize, cfg.data.max_area, cfg.data.size,
                                           cfg.model.activation_reference_pixels),
        optimizer_state_bytes=adamw_state_bytes(params))
    runtime.print0(f"[rl] activation checkpointing: {ckpt}")
    apply_speed_options(transformer, attention_backend=cfg.model.attention_backend, compile=cfg.model.compile)
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    model, optimizer = accelerator.prepare(transformer, optimizer)
    position = Position()
    runtime.print0(f"[rl] {len(prompts)} prompts; {world} rank(s) x {cfg.train.prompts_per_step} prompt(s) x G={G} "
                   f"= {samples_per_iter * world} rollouts per iteration; {S} SDE steps, {n_train} trained per "
                   f"sample; accumulation {cfg.train.grad_accum} samples -> {steps_per_iter} optimizer steps per "
                   f"iteration; rewards {dict(cfg.reward.weights)}; LoRA r{cfg.lora.rank} alpha {cfg.lora.alpha:g} "
                   f"on {len(targets)} layers")

    resume_from = None
    if cfg.train.resume == "auto":
        resume_from = latest_checkpoint(run_dir)
    elif cfg.train.resume != "never":
        resume_from = Path(cfg.train.resume)
    if resume_from is not None:
        position.load_state_dict(load_training_state(resume_from / "training_state", accelerator, model, optimizer,
                                                     None, lora=True))
        runtime.print0(f"[rl] resumed from {resume_from} at step {position.step} (iteration {position.iteration})")
        if judge is not None:
            judge.load_totals(position.judge_totals)  # judge/total_* go on from the checkpoint's counts

    sigmas = sigma_schedule(S, s.shift)
    metrics = runtime.MetricsWriter(run_dir, wandb_enabled=cfg.wandb, wandb_project=cfg.wandb_project,
                                    config=to_container(cfg), resume_step=position.step)  # rows past it: superseded
    bar = runtime.progress(total=cfg.train.max_steps, desc="grpo", unit="step", initial=position.step)
    if ckpt["mode"] in ("budget", "pinned"):  # the default modes add no row (metrics.jsonl stays one row per log)
        metrics.log({"activation_checkpointing": ckpt}, step=position.step)

    # ================================================================ loop
    t_start, timed_out = time.time(), False
    try:
        while position.step < cfg.train.max_steps and not timed_out:
            it = position.iteration
            t0 = time.time()
            if judge is not None:
                judge.reset_stats()  # judge/* of this iteration's requests only; judge/total_* for the run
            # ---- rollout (the judge scores group k / chunk i while group k+1 / chunk i+1 is sampled)
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.eval()
            items = []
            for i in range(cfg.train.prompts_per_step):
                p_index = ((it * world + rank) * cfg.train.prompts_per_step + i) % len(prompts)
                items.append((p_index, prompts[p_index], _load_source(prompts[p_index])))
            groups, pending = sample_and_score(cfg, pipe, unwrapped, items, it, rank, bg, judge, names)
            t_rollout = time.time() - t0
            # ---- rewards (what is left of the scoring once sampling is done)
            t1 = time.time()
            rewards = gather_rewards(pending, names)
            t_reward = time.time() - t1
            fail_rate = R.failure_rate(rewards)
            R.check_failures(rewards, cfg.judge.max_failure_rate, judge=judge)  # raises RewardFailure: run aborts
            group_ids = [gi for gi in range(len(groups)) for _ in range(G)]
            adv, valid = combine(rewards, dict(cfg.reward.weights), group_ids)
            zero_frac = zero_variance_fraction(adv, group_ids)
            if cfg.reward.gdpo:
                adv = gdpo(adv, valid, cfg.reward.adv_clip, gather=dist_gather)
            else:
                adv = adv.clamp(-cfg.reward.adv_clip, cfg.reward.adv_clip)
            # ---- train
            t2 = time.time()
            unwrapped.train()
            stats = train_iteration(cfg, accelerator, model, unwrapped, optimizer, params, pipe, groups, adv, sigmas,
                                    n_train, position, it, rank, device, bar)
            t_train = time.time() - t2
            position.iteration += 1
            if ckpt["mode"] == "budget" and "measured_peak_gib" not in ckpt:  # the plan against the first iteration
                ckpt["measured_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
                runtime.print0(f"[rl] activation budget {ckpt['budget_gib']} GiB: predicted peak "
                               f"{ckpt['predicted_peak_gib']} GiB, measured {ckpt['measured_peak_gib']} GiB")
                metrics.log({"activation_checkpointing": ckpt}, step=position.step)
            row = {"iteration": position.iteration, "rollout_s": round(t_rollout, 3), "reward_s": round(t_reward, 3),
                   "train_s": round(t_train, 3), "judge_failure_rate": fail_rate, "zero_variance_groups": zero_frac,
                   **{f"reward/{n}": _mean(v) for n, v in rewards.items()}, **stats}
            if judge is not None:
                position.judge_totals = judge.totals()  # saved with the checkpoint below
                row.update({f"judge/{k}": v for k, v in {**judge.stats(), **judge.total_stats()}.items()})
            metrics.log(row, step=position.step)
            if accelerator.is_main_process:
                write_curves(run_dir)  # run_dir/curves.png: rewards, failures, clipping, ratio, KL, phase times
            if accelerator.is_main_process and cfg.train.grid_every and it % cfg.train.grid_every == 0:
                _save_grid(run_dir, it, groups, rewards, G, metrics, items)
            crossed = position.step // cfg.train.checkpoint_every != (position.step - steps_per_iter) // cfg.train.checkpoint_every
            timed_out = _out_of_time(accelerator, cfg.train.time_limit_s, time.time() - t_start, device)
            if crossed or position.step >= cfg.train.max_steps or timed_out:
                save_checkpoint(accelerator, model, optimizer, cfg, position, lora_info)
    finally:
        bar.close()
        metrics.close()
        if judge is not None:
            bg.submit(judge.aclose()).result()
        bg.close()
    accelerator.wait_for_everyone()
    stop = f" (train.time_limit_s={cfg.train.time_limit_s:g} reached)" if timed_out else ""
    runtime.print0(f"[rl] done: {position.step} steps, {position.iteration} iterations{stop}; checkpoints in "
                   f"{run_dir / 'checkpoints'}")
    accelerator.end_training()
    return {"step": position.step, "timed_out": timed_out, "transformer": accelerator.unwrap_model(model),
            "activation_checkpointing": ckpt}


def _out_of_time(accelerator, limit_s: float, elapsed_s: float, device) -> bool:
    """train.time_limit_s reached? Rank 0's clock decides for all ranks (no rank may stop alone)."""
    if limit_s <= 0:
        return False
    if accelerator.num_processes == 1:
        return elapsed_s >= limit_s
    from accelerate.utils import broadcast

    flag = torch.tensor([1.0 if elapsed_s >= limit_s else 0.0], device=device)
    return bool(broadcast(flag, from_process=0).item() > 0)


def sample_and_score(cfg, pipe, transformer, items, it, rank, bg, judge, names) -> tuple[list, list]:
    """Sample one group per (prompt_index, prompt, source image) in `items`. Each rollout chunk's reward
    scoring goes to the background loop as soon as the chunk is decoded, so the judge scores chunk i (and
    group k) while the GPU samples chunk i+1 (and group k+1). Returns (groups, pending): pending[g] lists
    group g's reward futures in sample order (see gather_rewards)."""
    from etchr_rl import rewards as R

    s = cfg.sampling
    groups, pending = [], []
    for p_index, prompt, source in items:
        futures = []

        def submit(indices, images, prompt=prompt, source=source, futures=futures):
            inputs = [R.RewardInput(instruction=prompt.instruction, question=prompt.question, answer=prompt.answer,
                                    original=source, edited=img, meta=prompt.meta) for img in images]
            futures.append(bg.submit(R.compute_rewards(inputs, names, judge, cfg)))

        groups.append(sample_group(pipe, transformer, prompt.instruction, source, group_size=s.group_size,
                                   steps=s.steps, shift=s.shift, eta=s.eta, seed=cfg.train.seed, step=it,
                                   prompt_index=p_index, rank=rank, same_init_noise=s.same_init_noise_in_group,
                                   resize=cfg.data.resize, max_area=cfg.data.max_area, size=cfg.data.size,
                                   max_sequence_length=cfg.model.max_sequence_length, batch_group=s.batch_group,
                                   chunk=s.rollout_chunk, on_chunk=submit))
        pending.append(futures)
    return groups, pending


def gather_rewards(pending, names) -> dict:
    """Wait for the reward futures of sample_and_score; name -> one value per sample, groups in order."""
    rewards = {n: [] for n in names}
    for futures in pending:
        for f in futures:
            for n, vals in f.result().items():
                rewards[n].extend(vals)
    return rewards


def train_iteration(cfg, accelerator, model, unwrapped, optimizer, params, pipe, groups, adv, sigmas, n_train,
                    position, it, rank, device, bar) -> dict:
    """The clipped-ratio loss on the stored trajectories; one optimizer step per grad_accum samples.

    Each sample trains n_train randomly picked transitions; each transition's loss is divided by
    (grad_accum * n_train) and the window's sum is back-propagated. With train.micro_batch > 1 up to that many
    transitions of one prompt (same conditioning) within one accumulation window share a forward: the same sum,
    fewer and larger forwards. DDP syncs gradients only on the last backward of a window.
    """
    s = cfg.sampling
    G, S = s.group_size, s.steps
    accum = cfg.train.grad_accum
    st = {"ratios": [], "clipped": [], "losses": [], "kls": [], "grad_norms": []}
    window, sample = [], 0
    for gi, g in enumerate(groups):
        for j in range(G):
            # 14 of the 24 kept transitions, drawn per sample (seeded: resume and ranks reproduce it)
            pick = torch.randperm(S - 1, generator=noise_generator(cfg.train.seed, it, g.prompt_index, rank,
                                                                    20_000 + j))[:n_train].sort().values.tolist()
            window.extend((gi, j, k, sample) for k in pick)
            sample += 1
            if sample % accum == 0:  # the end of an accumulation window: its micro-batches, then one step
                batches = _micro_batches(window, cfg.train.micro_batch)
                for b, mb in enumerate(batches):
                    sync = b == len(batches) - 1
                    ctx = nullcontext() if sync or accelerator.num_processes == 1 else accelerator.no_sync(model)
                    with ctx:
                        _train_micro_batch(cfg, accelerator, model, unwrapped, pipe, groups[mb[0][0]], mb, adv,
                                           sigmas, accum * n_train, device, st)
                window = []
                norm = accelerator.clip_grad_norm_(params, cfg.optim.grad_clip) if cfg.optim.grad_clip > 0 else None
                st["grad_norms"].append(float(norm) if norm is not None else float("nan"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                position.step += 1
                bar.update(1)
    out = {"loss": _mean(st["losses"]), "ratio_mean": _mean(st["ratios"]), "clip_fraction": _mean(st["clipped"]),
           "ratio_min": min(st["ratios"], default=None), "ratio_max": max(st["ratios"], default=None),
           "grad_norm": _mean(st["grad_norms"]), "advantage_abs_mean": float(adv.abs().mean())}
    if st["kls"]:
        out["kl"] = _mean(st["kls"])
    return out


def _micro_batches(window: list, size: int) -> list:
    """Consecutive runs of at most `size` (group, sample, transition, sample index) items of the same group."""
    batches = []
    for item in window:
        if batches and len(batches[-1]) < size and batches[-1][-1][0] == item[0]:
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


def _train_micro_batch(cfg, accelerator, model, unwrapped, pipe, g, mb, adv, sigmas, denom, device, st) -> None:
    """One forward + backward of the transitions `mb` of group g: sum_t loss_t / denom (the per-row SDE math
    is the batch-1 code applied row by row, so micro-batching changes only the forward's batch size)."""
    from etchr_rl.model import latent_grid, target_ids

    s = cfg.sampling
    n = len(mb)
    h, w = latent_grid(pipe, *g.size)
    ids = target_ids(h, w, n, device)
    js, ks = [item[1] for item in mb], [item[2] for item in mb]
    x = torch.stack([g.states[j, k] for j, k in zip(js, ks)]).to(device)
    x_next = torch.stack([g.next_states[j, k] for j, k in zip(js, ks)]).to(device)
    mu_old = torch.stack([g.means[j, k] for j, k in zip(js, ks)]).to(device)
    logp_old = torch.stack([g.logps[j, k] for j, k in zip(js, ks)]).to(device)
    a = adv[[item[3] for item in mb]].to(device=device, dtype=torch.float32)
    sigma = torch.tensor([float(sigmas[k]) for k in ks], device=device)
    v = velocity(model, x, ids, g.ref, g.ref_ids, sigma, g.embeds, g.text_ids)
    v_ref = None
    if cfg.optim.kl_coef > 0:
        with torch.no_grad():
            unwrapped.disable_adapters()
            v_ref = velocity(unwrapped, x, ids, g.ref, g.ref_ids, sigma, g.embeds, g.text_ids)
            unwrapped.enable_adapters()
    losses, ratios, kls = [], [], []
    for i, k in enumerate(ks):
        row = slice(i, i + 1)
        _, dt, sc = step_noise_scale(sigmas, k, s.eta)
        mu_new = sde_mean(x[row], v[row], sigmas, k, s.eta)
        logp_new = log_prob(x_next[row], mu_new, sc)
        r = ratio(logp_new, logp_old[row], mu_new, mu_old[row], sc)
        loss = clipped_loss(a[row], r, cfg.optim.clip_range, dt).mean()
        if v_ref is not None:
            kl = ((mu_new - sde_mean(x[row], v_ref[row], sigmas, k, s.eta)) ** 2).mean() / (2 * sc * sc)
            loss = loss + cfg.optim.kl_coef * kl
            kls.append(kl.detach())
        losses.append(loss)
        ratios.append(r.detach().view(()))
    accelerator.backward(torch.stack(losses).sum() / denom)
    for r in torch.stack(ratios).tolist():
        st["ratios"].append(r)
        st["clipped"].append(float(abs(r - 1.0) > cfg.optim.clip_range))
    st["losses"].extend(torch.stack(losses).detach().tolist())
    if kls:
        st["kls"].extend(torch.stack(kls).tolist())


# ================================================================ save
def save_checkpoint(accelerator, model, optimizer, cfg, position: Position, lora_info) -> Path:
    import shutil

    final = step_dir(cfg.train.run_dir, position.step)
    tmp = final.parent / f".{final.name}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    save_training_state(tmp / "training_state", accelerator, model, optimizer, None, position.state_dict(), lora=True)
    if accelerator.is_main_process:
        save_lora(accelerator.unwrap_model(model), tmp, lora_info["rank"], lora_info["alpha"], lora_info["targets"])
        finalize(tmp, final, meta(kind="lora", step=position.step, base_model=cfg.model.pretrained_path,
                                  config=to_container(cfg), lora=lora_info), cfg.train.keep_last)
    accelerator.wait_for_everyone()
    return final


def _save_grid(run_dir: Path, it: int, groups, rewards: dict, G: int, metrics, items) -> None:
    """One row per group: its source image, then its G edits captioned with their rewards; the prompt
    beneath. `items`: the (prompt_index, prompt, source) of each group, as sampled."""
    from PIL import ImageDraw

    rows = []
    for gi, g in enumerate(groups):
        _, prompt, source = items[gi]
        row = compose_panel(source, list(g.images), prompt.instruction, thumb=160)
        draw = ImageDraw.Draw(row)
        for j in range(len(g.images)):
            label = " ".join(f"{n[:4]}={_fmt(v[gi * G + j])}" for n, v in rewards.items())
            draw.text(((j + 1) * 160 + 2, 2), label, fill=(255, 0, 0))
        rows.append(row)
    grid = stack(rows)
    out = run_dir / "grids" / f"iter-{it:06d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    if metrics._wandb is not None:
        import wandb

        metrics._wandb.log({"edit_grid": wandb.Image(grid)})


def _load_source(prompt):
    from etchr_rl.images import open_rgb8  # the image rule (16-bit, alpha, EXIF, ...); ImageError names the file

    return open_rgb8(prompt.source_image, f"prompt {prompt.id} source_image {prompt.source_image}")


def _fmt(v) -> str:
    return "None" if v is None else f"{v:.2f}"


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


if __name__ == "__main__":
    sys.exit(main())
