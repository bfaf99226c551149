"""Checkpoints of an SFT run (CHECKPOINTS.md section 4): written under a temporary name and renamed
when complete, `latest` pointer, keep-last-K, meta.json beside the weights, and training_state/ in
a format that loads without unpickling (JSON + safetensors: a file planted in a checkpoint runs nothing)."""

from __future__ import annotations

import base64
import datetime
import json
import random
import re
import shutil
from pathlib import Path
from typing import Optional

from .runtime import atomic_write_json, atomic_write_text, git_sha, honour_umask, print0

SCHEMA_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary dirs of interrupted saves are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint, found by scanning (the `latest` file is only a pointer for people
    and tools; it can lag behind after a kill between the rename and its write)."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def repair_checkpoints(run_dir: str | Path) -> list[str]:
    """At start (rank 0, before anyone reads): delete what interrupted saves left (`.step-*.tmp` dirs,
    `.latest.*.tmp` files) and point `latest` at the newest complete checkpoint. Returns what it did."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            done.append(f"removed {p.name}")
    newest, pointer = latest_checkpoint(run_dir), root / "latest"
    want = newest.name + "\n" if newest is not None else None
    have = pointer.read_text() if pointer.is_file() else None
    if want is not None and have != want:
        atomic_write_text(pointer, want)
        done.append(f"latest -> {newest.name} (was {have.strip() if have else 'missing'})")
    elif want is None and have is not None:
        pointer.unlink()
        done.append("removed latest (no complete checkpoint)")
    return done


def meta(*, kind: str, step: Optional[int], base_model: str, config: dict, lora: Optional[dict] = None,
         parents: Optional[list] = None) -> dict:
    return {"schema_version": SCHEMA_VERSION, "tree": "sft", "kind": kind, "step": step, "base_model": base_model,
            "lora": lora, "parents": parents or [], "config": config, "git_sha": git_sha(),
            "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "etchr_version": "0.1.0"}


def finalize(tmp: Path, final: Path, meta_obj: dict, keep_last: int) -> None:
    """meta.json last (its presence marks a complete checkpoint), rename into place, prune, point latest."""
    atomic_write_json(tmp / "meta.json", meta_obj)
    honour_umask(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_text(final.parent / "latest", final.name + "\n")
    if keep_last > 0:
        for old in list_checkpoints(final.parent.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def read_meta(path: str | Path) -> Optional[dict]:
    p = Path(path) / "meta.json"
    return json.loads(p.read_text()) if p.is_file() else None


# ----------------------------------------------------------------------------------------------
# training_state/: weights being trained, optimizer, LR scheduler, RNG, data position; no pickle.
# ----------------------------------------------------------------------------------------------
STATE_FORMAT = "etchr-training-state"
STATE_VERSION = 2  # 1 was accelerate's save_state (pickled custom objects); refused, never unpickled
STATE_FILE = "state.json"
_PLAIN_FILES = {STATE_FILE, "optimizer.json", "optimizer.safetensors", "scheduler.json", "trainable.safetensors",
                "model.safetensors"}
_RNG_FILE = re.compile(r"^rng_(\d+)\.json$")
SHARD_INDEX = "shards.json"  # FSDP2: world size, every tensor's global shape and dtype, the optimizer's numbers
_SHARDED_FILES = {STATE_FILE, SHARD_INDEX, "scheduler.json"}
_SHARD_FILE = re.compile(r"^(model|optimizer)-rank(\d{5})-of-(\d{5})\.safetensors$")


class CheckpointError(ValueError):
    """A training_state that cannot be trusted or read; the message names the file."""


def save_training_state(out_dir: str | Path, accelerator, model, optimizer, scheduler, position: dict, *,
                        lora: bool, deepspeed_kwargs: Optional[dict] = None) -> None:
    """Write out_dir (every rank calls this; returns after all ranks wrote). Plain runs: weights being
    trained and optimizer in safetensors (+ JSON for the optimizer's numbers), scheduler and position in
    JSON, one rng_<rank>.json per rank. DeepSpeed: its engine checkpoint (model + sharded optimizer) via
    accelerate, the rest as above; load_training_state reads the engine files with weights_only=True.
    FSDP2: every rank writes its local shards (save_sharded_state), the rest as above."""
    from safetensors.torch import save_file, save_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    deepspeed = accelerator.distributed_type == "DEEPSPEED"
    fsdp = accelerator.distributed_type == "FSDP"
    accelerator.wait_for_everyone()
    if deepspeed:
        accelerator.save_state(str(out_dir), **(deepspeed_kwargs or {}))
    if fsdp:
        save_sharded_state(out_dir, accelerator.unwrap_model(model), optimizer, rank=accelerator.process_index,
                           world=accelerator.num_processes, trainable_only=lora)
    _write_json(out_dir / f"rng_{accelerator.process_index}.json", rng_state())
    if accelerator.is_main_process:
        if not deepspeed and not fsdp:
            unwrapped = accelerator.unwrap_model(model)
            if lora:
                from peft.utils import get_peft_model_state_dict

                sd = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unwrapped).items()}
                save_file(sd, str(out_dir / "trainable.safetensors"))
            else:
                save_model(unwrapped, str(out_dir / "model.safetensors"))
            tensors, numbers = _split_optimizer_state(optimizer.state_dict())
            save_file(tensors, str(out_dir / "optimizer.safetensors"))
            _write_json(out_dir / "optimizer.json", numbers)
        if scheduler is not None:
            _write_json(out_dir / "scheduler.json", scheduler.state_dict())
        _write_json(out_dir / STATE_FILE, {"format": STATE_FORMAT, "version": STATE_VERSION, "position": position,
                                           "accelerator_step": int(accelerator.step), "deepspeed": deepspeed,
                                           "fsdp": fsdp, "world_size": accelerator.num_processes})
    accelerator.wait_for_everyone()


def load_training_state(in_dir: str | Path, accelerator, model, optimizer, scheduler, *, lora: bool,
                        deepspeed_kwargs: Optional[dict] = None) -> dict:
    """Restore what save_training_state wrote; returns the saved position. Nothing is unpickled with
    weights_only=False: an unknown file, an old pickle-format state or a bad file is a CheckpointError
    naming the file, raised before any state changes."""
    in_dir = Path(in_dir)
    state = _read_state(in_dir)
    deepspeed = accelerator.distributed_type == "DEEPSPEED"
    if bool(state.get("deepspeed")) != deepspeed:
        raise CheckpointError(f"{in_dir / STATE_FILE}: written {'with' if state.get('deepspeed') else 'without'} "
                              f"DeepSpeed; this run is {'with' if deepspeed else 'without'} it")
    fsdp = accelerator.distributed_type == "FSDP"
    if bool(state.get("fsdp")) != fsdp:
        raise CheckpointError(f"{in_dir / STATE_FILE}: written {'with' if state.get('fsdp') else 'without'} FSDP; "
                              f"this run is {'with' if fsdp else 'without'} it")
    rng_file = in_dir / f"rng_{accelerator.process_index}.json"
    if fsdp:
        _check_plain_files(in_dir, sharded=True)
        load_sharded_state(in_dir, accelerator.unwrap_model(model), optimizer, rank=accelerator.process_index,
                           world=accelerator.num_processes, trainable_only=lora)
    elif not deepspeed:
        _check_plain_files(in_dir)
        from safetensors import SafetensorError
        from safetensors.torch import load_file, load_model

        weights = in_dir / ("trainable.safetensors" if lora else "model.safetensors")
        unwrapped = accelerator.unwrap_model(model)
        try:
            opt_state = _join_optimizer_state(load_file(str(in_dir / "optimizer.safetensors")),
                                              _read_json(in_dir / "optimizer.json"), optimizer)
            if lora:
                from peft.utils import set_peft_model_state_dict

                result = set_peft_model_state_dict(unwrapped, load_file(str(weights)))
                if getattr(result, "unexpected_keys", None):
                    raise CheckpointError(f"{weights}: unexpected LoRA keys {result.unexpected_keys[:5]}")
            else:
                load_model(unwrapped, str(weights), strict=True)
        except (SafetensorError, OSError, KeyError, RuntimeError) as exc:  # safetensors' errors name no file
            raise CheckpointError(f"{in_dir}: cannot read the training state ({type(exc).__name__}: {exc})") from None
        optimizer.load_state_dict(opt_state)
    else:
        _safe_deepspeed_loads(model)
        accelerator.load_state(str(in_dir), **(deepspeed_kwargs or {}))
    if scheduler is not None:
        scheduler.load_state_dict(_read_json(in_dir / "scheduler.json"))
    if rng_file.is_file():
        set_rng_state(_read_json(rng_file), rng_file)
    else:  # another world size: per-sample generators keep the data order; the global streams restart
        print0(f"[resume] {rng_file.name} absent (saved with {state.get('world_size')} process(es), now "
               f"{accelerator.num_processes}): global RNG states not restored")
    accelerator.step = int(state.get("accelerator_step", 0))
    return state["position"]


def _read_state(in_dir: Path) -> dict:
    path = in_dir / STATE_FILE
    if not path.is_file():
        old = sorted(p.name for p in in_dir.glob("*.pkl")) if in_dir.is_dir() else []
        why = (f"it holds {', '.join(old)}: the old pickle format, which this trainer no longer loads (unpickling "
               "can run code); restart the run from its LoRA / weights, or resume with the commit that wrote it"
               if old else "not a training_state written by this trainer")
        raise CheckpointError(f"{path} missing: {why}")
    state = _read_json(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: not a version-{STATE_VERSION} {STATE_FORMAT} file")
    if not isinstance(state.get("position"), dict):
        raise CheckpointError(f"{path}: no position")
    return state


def _check_plain_files(in_dir: Path, sharded: bool = False) -> None:
    """Only the files save_training_state writes: anything else (a planted .pkl / .bin) stops the resume."""
    allowed = _SHARDED_FILES if sharded else _PLAIN_FILES
    for p in sorted(in_dir.iterdir()):
        if p.name in allowed or _RNG_FILE.match(p.name) or (sharded and _SHARD_FILE.match(p.name)):
            if not p.is_file() or p.is_symlink():
                raise CheckpointError(f"{p}: expected a plain file")
            continue
        raise CheckpointError(f"{p}: unexpected file in a training_state (it holds only {sorted(allowed)}"
                              f"{', <model|optimizer>-rankR-of-W.safetensors' if sharded else ''} and "
                              "rng_<rank>.json); refusing to resume from a checkpoint that was altered")


def _safe_deepspeed_loads(engine) -> None:
    """DeepSpeed's checkpoint engine loads with torch.load(weights_only=False); make this engine's loads
    weights_only=True, allowing only the few DeepSpeed classes its checkpoints hold."""
    import torch

    allowed = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO-1/2 optimizer states: param_slice_mappings

        allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # pragma: no cover - only under DeepSpeed
        pass
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        raise CheckpointError("DeepSpeed engine without a checkpoint_engine: cannot load its state safely")

    def load(path, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - the unpickler raises several types
            try:  # name every global the file needs beyond the allow-list, so a refusal can be reviewed
                extra = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
                               - {f"{c.__module__}.{c.__qualname__}" for c in allowed})
            except Exception:  # noqa: BLE001 - an unreadable file: the first message says enough
                extra = []
            raise CheckpointError(f"{path}: refused to load ({type(exc).__name__}: {str(exc)[:300]})"
                                  + (f"; globals outside the allow-list: {extra}" if extra else "")) from None

    ce.load = load


def _split_optimizer_state(sd: dict) -> tuple[dict, dict]:
    """torch optimizer state_dict -> (tensors for safetensors, JSON numbers)."""
    import torch

    tensors, state = {}, {}
    for idx, entry in sd["state"].items():
        numbers = {}
        for k, v in entry.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                numbers[k] = v
        state[str(idx)] = numbers
    return tensors, {"param_groups": sd["param_groups"], "state": state, "tensors": sorted(tensors)}


def _join_optimizer_state(tensors: dict, numbers: dict, optimizer) -> dict:
    """The inverse of _split_optimizer_state, shaped like `optimizer`'s own state_dict (tuples kept)."""
    if set(numbers.get("tensors", [])) != set(tensors):
        raise KeyError("optimizer.json and optimizer.safetensors list different tensors")
    state = {int(i): dict(v) for i, v in numbers["state"].items()}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state[int(idx)][name] = t
    groups = []
    for saved, current in zip(numbers["param_groups"], optimizer.param_groups):
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()})
    if len(groups) != len(optimizer.param_groups):
        raise KeyError(f"{len(numbers['param_groups'])} saved parameter groups, the optimizer has "
                       f"{len(optimizer.param_groups)}")
    return {"state": state, "param_groups": groups}


def rng_state() -> dict:
    """Python, NumPy, torch CPU (and CUDA) generator states as JSON; byte states in base64."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [version, list(internal), gauss], "numpy": [name, [int(k) for k in keys], int(pos),
                                                                  int(has_gauss), float(cached)],
           "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict, source: Path) -> None:
    import numpy as np
    import torch

    try:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), None if gauss is None else float(gauss)))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
        torch.set_rng_state(_unb64(state["torch"]))
        if state.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: not a valid RNG state ({type(exc).__name__}: {exc})") from None


def _b64(t) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str):
    import torch

    return torch.frombuffer(bytearray(base64.b64decode(s, validate=True)), dtype=torch.uint8).clone()


def _write_json(path: Path, obj) -> None:
    """Strict JSON (no str() fallback: a value JSON cannot hold is a bug to see at save time)."""
    atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=True) + "\n")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} missing from the training_state") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not JSON ({exc})") from None


# ----------------------------------------------------------------------------------------------
# FSDP2 (accelerate fsdp_version: 2, fully_shard): every rank writes its own shards, pickle-free.
# ----------------------------------------------------------------------------------------------
def shard_file(kind: str, rank: int, world: int) -> str:
    return f"{kind}-rank{rank:05d}-of-{world:05d}.safetensors"


def _inner_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def _local(t):
    from torch.distributed.tensor import DTensor

    return (t.to_local() if isinstance(t, DTensor) else t).detach().cpu().contiguous()


def _describe(t) -> dict:
    from torch.distributed.tensor import DTensor

    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "dtensor": isinstance(t, DTensor)}


def _sharded_model_state(model, trainable_only: bool) -> dict:
    """FQN -> DTensor (sharded parameters) or tensor, as torch.distributed.checkpoint sees the model;
    with trainable_only (LoRA) just the parameters being trained (the base comes from the pretrained files)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model)
    if trainable_only:
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        sd = {k: v for k, v in sd.items() if k in keep}
    return sd


def save_sharded_state(out_dir: Path, model, optimizer, *, rank: int, world: int, trainable_only: bool) -> None:
    """Every rank: model-rankR-of-W.safetensors and optimizer-rankR-of-W.safetensors with its local shards
    (DTensor.to_local()); rank 0 also shards.json (world size, global shapes, the optimizer's numbers).
    A collective: all ranks call it."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    msd = _sharded_model_state(model, trainable_only)
    osd = get_optimizer_state_dict(model, _inner_optimizer(optimizer))
    save_file({k: _local(v) for k, v in msd.items()}, str(out_dir / shard_file("model", rank, world)))
    tensors, numbers = {}, {}
    for fqn, entry in osd["state"].items():
        numbers[fqn] = {}
        for k, v in entry.items():
            if hasattr(v, "shape"):
                tensors[f"{fqn}:{k}"] = _local(v)
                numbers[fqn][k] = {"tensor": _describe(v)}
            else:
                numbers[fqn][k] = v
    save_file(tensors, str(out_dir / shard_file("optimizer", rank, world)))
    if rank == 0:
        _write_json(out_dir / SHARD_INDEX, {"world_size": world, "trainable_only": trainable_only,
                                            "model": {k: _describe(v) for k, v in msd.items()},
                                            "optimizer": {"param_groups": osd["param_groups"], "state": numbers}})


def load_sharded_state(in_dir: Path, model, optimizer, *, rank: int, world: int, trainable_only: bool) -> None:
    """Restore what save_sharded_state wrote, into the model's DTensors (same mesh and placements) and the
    optimizer. Another world size is refused (the shards are cut for the old one); every check runs before
    anything is set."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.tensor import DTensor

    index = _read_json(in_dir / SHARD_INDEX)
    saved_world = index.get("world_size") if isinstance(index, dict) else None
    if saved_world != world:
        raise CheckpointError(f"{in_dir / SHARD_INDEX}: FSDP shards for {saved_world} process(es), this run has "
                              f"{world}; resume with {saved_world} processes (NGPU x NNODES), or export the "
                              "checkpoint's full weights and start a new run from them")
    if bool(index.get("trainable_only")) != trainable_only:
        raise CheckpointError(f"{in_dir / SHARD_INDEX}: written for {'LoRA' if index.get('trainable_only') else 'full'}"
                              f" fine-tuning; this run is {'LoRA' if trainable_only else 'full'} fine-tuning")
    files = {kind: in_dir / shard_file(kind, rank, world) for kind in ("model", "optimizer")}
    try:
        local_model, local_opt = load_file(str(files["model"])), load_file(str(files["optimizer"]))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{in_dir}: cannot read rank {rank}'s shards ({type(exc).__name__}: {exc})") from None

    current = _sharded_model_state(model, trainable_only)
    if set(index["model"]) != set(current) or set(local_model) != set(current):
        missing, extra = sorted(set(current) - set(local_model)), sorted(set(local_model) - set(current))
        raise CheckpointError(f"{files['model']}: tensors differ from the model (missing {missing[:5]}, "
                              f"unexpected {extra[:5]})")

    def rebuild(name: str, like, local, described: dict, source: Path):
        """The saved local shard as a tensor placed like `like` (a DTensor: same mesh and placements)."""
        if list(like.shape) != described["shape"] or str(like.dtype).replace("torch.", "") != described["dtype"]:
            raise CheckpointError(f"{source}: {name} was saved as {described['dtype']}{described['shape']}, the "
                                  f"model has {like.dtype}{list(like.shape)}")
        if not isinstance(like, DTensor):
            return local.to(like.device)
        want = tuple(like.to_local().shape)
        if tuple(local.shape) != want:
            raise CheckpointError(f"{source}: {name} local shard {tuple(local.shape)}, this rank holds {want}")
        return DTensor.from_local(local.to(like.to_local().device), like.device_mesh, like.placements,
                                  run_check=False, shape=like.shape, stride=like.stride())

    new_model = {k: rebuild(k, v, local_model[k], index["model"][k], files["model"]) for k, v in current.items()}
    params = dict(model.named_parameters())
    opt_numbers, new_state = index["optimizer"], {}
    for fqn, entry in opt_numbers["state"].items():
        if fqn not in params:
            raise CheckpointError(f"{in_dir / SHARD_INDEX}: optimizer state for {fqn}, not a parameter of the model")
        new_state[fqn] = {}
        for k, v in entry.items():
            if isinstance(v, dict) and "tensor" in v:
                key = f"{fqn}:{k}"
                if key not in local_opt:
                    raise CheckpointError(f"{files['optimizer']}: {key} missing")
                like = params[fqn].detach() if v["tensor"]["dtensor"] else local_opt[key]
                if v["tensor"]["dtensor"]:  # exp_avg / exp_avg_sq: the parameter's shape, sharding and mesh
                    like = like.to(getattr(torch, v["tensor"]["dtype"]))
                new_state[fqn][k] = rebuild(key, like, local_opt[key], v["tensor"], files["optimizer"])
            else:
                new_state[fqn][k] = v
    groups = _inner_optimizer(optimizer).param_groups
    if len(opt_numbers["param_groups"]) != len(groups):
        raise CheckpointError(f"{in_dir / SHARD_INDEX}: {len(opt_numbers['param_groups'])} parameter groups saved, "
                              f"the optimizer has {len(groups)}")
    new_groups = [{k: tuple(v) if isinstance(cur.get(k), tuple) else v for k, v in saved.items()}
                  for saved, cur in zip(opt_numbers["param_groups"], groups)]
    set_model_state_dict(model, new_model, options=StateDictOptions(strict=not trainable_only))
    set_optimizer_state_dict(model, _inner_optimizer(optimizer), {"state": new_state, "param_groups": new_groups})


def full_state_dict(model, trainable_only: bool) -> dict:
    """The whole (unsharded) weights on CPU on rank 0, an empty dict elsewhere. A collective under FSDP:
    all ranks call it. trainable_only: just the trained parameters (LoRA)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainable_only:
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        sd = {k: v for k, v in sd.items() if k in keep}
    return sd


def export_fsdp(model, out_dir: Path, lora_info: Optional[dict], rank: int) -> None:
    """FSDP's final files, full tensors written by rank 0 (all ranks call it: the gather is collective):
    LoRA -> out_dir/pytorch_lora_weights.safetensors in diffusers naming with alpha (as lora.save_lora);
    full fine-tuning -> out_dir/transformer/ (config.json + diffusion_pytorch_model*.safetensors, sharded
    with an index past 10 GB, as diffusers' save_pretrained)."""
    full = full_state_dict(model, trainable_only=bool(lora_info))
    if rank != 0:
        return
    if lora_info:
        from diffusers import Flux2KleinPipeline
        from peft.utils import get_peft_model_state_dict

        from .lora import LORA_FILE

        state = {k: v.contiguous() for k, v in get_peft_model_state_dict(model, state_dict=full).items()}
        Flux2KleinPipeline.save_lora_weights(
            str(out_dir), transformer_lora_layers=state, weight_name=LORA_FILE,
            transformer_lora_adapter_metadata={"r": lora_info["rank"], "lora_alpha": lora_info["alpha"],
                                               "target_modules": list(lora_info["targets"])})
        return
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    target = out_dir / "transformer"
    target.mkdir(parents=True, exist_ok=True)
    model.save_config(str(target))
    split = split_torch_state_dict_into_shards(full, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                                               max_shard_size="10GB")
    for filename, names in split.filename_to_tensors.items():
        save_file({n: full[n].contiguous() for n in names}, str(target / filename), metadata={"format": "pt"})
    if split.is_sharded:
        _write_json(target / "diffusion_pytorch_model.safetensors.index.json",
                    {"metadata": split.metadata, "weight_map": split.tensor_to_filename})
