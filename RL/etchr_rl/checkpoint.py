"""Checkpoints of an RL run (CHECKPOINTS.md section 4): written under a temporary name and renamed
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
    return {"schema_version": SCHEMA_VERSION, "tree": "rl", "kind": kind, "step": step, "base_model": base_model,
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


class CheckpointError(ValueError):
    """A training_state that cannot be trusted or read; the message names the file."""


def save_training_state(out_dir: str | Path, accelerator, model, optimizer, scheduler, position: dict, *,
                        lora: bool, deepspeed_kwargs: Optional[dict] = None) -> None:
    """Write out_dir (every rank calls this; returns after all ranks wrote). Plain runs: weights being
    trained and optimizer in safetensors (+ JSON for the optimizer's numbers), scheduler and position in
    JSON, one rng_<rank>.json per rank. DeepSpeed: its engine checkpoint (model + sharded optimizer) via
    accelerate, the rest as above; load_training_state reads the engine files with weights_only=True."""
    from safetensors.torch import save_file, save_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    deepspeed = accelerator.distributed_type == "DEEPSPEED"
    accelerator.wait_for_everyone()
    if deepspeed:
        accelerator.save_state(str(out_dir), **(deepspeed_kwargs or {}))
    _write_json(out_dir / f"rng_{accelerator.process_index}.json", rng_state())
    if accelerator.is_main_process:
        if not deepspeed:
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
                                           "world_size": accelerator.num_processes})
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
    rng_file = in_dir / f"rng_{accelerator.process_index}.json"
    if not deepspeed:
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


def _check_plain_files(in_dir: Path) -> None:
    """Only the files save_training_state writes: anything else (a planted .pkl / .bin) stops the resume."""
    for p in sorted(in_dir.iterdir()):
        if p.name in _PLAIN_FILES or _RNG_FILE.match(p.name):
            if not p.is_file() or p.is_symlink():
                raise CheckpointError(f"{p}: expected a plain file")
            continue
        raise CheckpointError(f"{p}: unexpected file in a training_state (it holds only {sorted(_PLAIN_FILES)} and "
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
