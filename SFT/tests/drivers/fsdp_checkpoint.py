"""FSDP2 checkpoint round trip on CPU: `torchrun --nproc_per_node 2 fsdp_checkpoint.py MODE OUT_DIR`.

MODE full: every parameter trains; MODE lora: the first layer is frozen (the "base"), the rest trains.
A small module with uneven shards (7 and 3 rows over 2 ranks) is fully_shard-ed on a gloo group and
trained 3 steps; save_sharded_state writes OUT_DIR/ckpt; a model built with other trainable values
loads it; its parameters and optimizer state, the step-4 loss and the parameters after step 4 are
compared with the uninterrupted model. Also: a resume under another world size is refused, and
full_state_dict gives rank 0 the whole tensors (others nothing). Rank 0 writes OUT_DIR/result.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from etchr_sft.checkpoint import CheckpointError, full_state_dict, load_sharded_state, save_sharded_state  # noqa: E402


def build(mode: str, mesh, other_values: bool):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    if mode == "lora":
        model[0].requires_grad_(False)
    if other_values:  # what load must overwrite: the trainable values differ, the frozen base is the same
        torch.manual_seed(123)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, betas=(0.9, 0.99),
                            weight_decay=0.01)
    return model, opt


def step(model, opt, n: int) -> float:
    g = torch.Generator().manual_seed(1000 * n + dist.get_rank())
    x, y = torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return mean.item() / dist.get_world_size()


def full_params(model) -> dict:
    return {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}


def full_optimizer(model, opt) -> dict:
    out = {}
    for n, p in model.named_parameters():
        for k, v in opt.state.get(p, {}).items():
            out[f"{n}:{k}"] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
    return out


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), (sorted(a), sorted(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    ckpt = out / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    lora = mode == "lora"

    model, opt = build(mode, mesh, other_values=False)
    losses = [step(model, opt, n) for n in (1, 2, 3)]
    params3, opt3 = full_params(model), full_optimizer(model, opt)
    save_sharded_state(ckpt, model, opt, rank=rank, world=world, trainable_only=lora)
    dist.barrier()
    loss4 = step(model, opt, 4)
    params4 = full_params(model)
    export = full_state_dict(model, trainable_only=lora)
    export_ok = (export == {}) if rank else (
        set(export) == {n for n, p in model.named_parameters() if p.requires_grad or not lora}
        and all(not hasattr(v, "to_local") and v.device.type == "cpu" and torch.equal(v, params4[k])
                for k, v in export.items()))

    resumed, ropt = build(mode, mesh, other_values=True)
    before = max_diff(full_params(resumed), params3)
    load_sharded_state(ckpt, resumed, ropt, rank=rank, world=world, trainable_only=lora)
    params_diff, opt_diff = max_diff(full_params(resumed), params3), max_diff(full_optimizer(resumed, ropt), opt3)
    resumed_loss4 = step(resumed, ropt, 4)
    after_diff = max_diff(full_params(resumed), params4)

    try:
        load_sharded_state(ckpt, resumed, ropt, rank=rank, world=world + 1, trainable_only=lora)
        refused = ""
    except CheckpointError as exc:
        refused = str(exc)
    try:
        load_sharded_state(ckpt, resumed, ropt, rank=rank, world=world, trainable_only=not lora)
        refused_kind = ""
    except CheckpointError as exc:
        refused_kind = str(exc)
    flags = torch.tensor([float(export_ok)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    if rank == 0:
        (out / "result.json").write_text(json.dumps({
            "losses": losses, "loss4": loss4, "resumed_loss4": resumed_loss4, "diff_before_load": before,
            "params_diff": params_diff, "optimizer_diff": opt_diff, "after_step_diff": after_diff,
            "optimizer_keys": sorted(opt3), "refused_world": refused, "refused_kind": refused_kind,
            "export_ok": bool(flags.item()), "export_keys": sorted(export),
            "export_shapes": {k: list(v.shape) for k, v in export.items()}}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
