"""SFT config: the schema (dataclasses), loading (schema -> YAML -> CLI overrides), saving.

Every field has a default and a comment with its unit. Loading fails on an unknown key, a wrong type
or a missing required value with a message naming the key and the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and the file) and how to fix it."""


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------
# The reference recipe's 144 LoRA targets (PROTOCOL.md section 1): these module-name suffixes in the
# double-stream and single-stream blocks, plus `single_transformer_blocks.{i}.attn.to_out` (a bare
# `to_out` makes peft fail on the double blocks' ModuleList, so the single blocks are listed by index).
REFERENCE_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                          "to_add_out", "linear_in", "linear_out", "to_qkv_mlp_proj"]


# diffusers attention backends that need no extra package (torch SDPA with a fixed kernel).
ATTENTION_BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "_native_math")
# Refused for training: cuDNN attention's backward crashed the process in both training benchmarks (H200,
# torch 2.11.0+cu130: CUBLAS_STATUS_EXECUTION_FAILED, then illegal memory accesses; docs/PERFORMANCE.md).
TRAINING_UNSAFE_ATTENTION_BACKENDS = ("_native_cudnn",)


@dataclass
class ModelConfig:
    pretrained_path: str = MISSING  # diffusers FLUX.2-klein pipeline dir (base-9B or a merged one)
    dtype: str = "bf16"  # weights dtype while training: bf16 (reference, pure bf16) | fp32
    gradient_checkpointing: bool = True  # per transformer block
    # Activation memory by budget (issue #17, docs/PERFORMANCE.md): 0 = off (gradient_checkpointing decides:
    # every block or none). A number = the peak GiB the training step may reach on each GPU; "auto" =
    # activation_budget_fraction of the card's memory. Before step 0 a probe at the CSV's largest sample
    # (its bucket's target + reference tokens, train.batch_size, max_sequence_length) measures the peak
    # with every block checkpointed and the extra per un-checkpointed block, then as many blocks as fit run
    # without checkpointing. CUDA only (refused on CPU: pin checkpoint_blocks there).
    activation_budget_gib: Any = 0
    activation_budget_fraction: float = 0.9  # of the card's total memory, for activation_budget_gib=auto
    # [n_double, n_single]: checkpoint the first n blocks of each stack (9B: 8 double, 24 single), run the
    # rest plainly; overrides the two keys above. null = as they say.
    checkpoint_blocks: Optional[list] = None
    max_sequence_length: int = 512  # text tokens
    # Speed switches (docs/PERFORMANCE.md). Both compute the same function; compiled / other attention
    # kernels round differently from eager SDPA, so they are off by default (the reference's path).
    # compile: torch.compile of each block that is not checkpointed (forward and backward); checkpointed blocks
    # run eagerly and, on CUDA, SDPA's cuDNN kernel is off. On an H200 with torch 2.11 a compiled block under the
    # checkpoint wrapper gave wrong LoRA gradients (max abs error 26 where eager's largest gradient is 1.3e-6,
    # fullgraph or not) and cuDNN attention's compiled backward crashed; compiled plain blocks matched eager
    # (docs/PERFORMANCE.md, "Compiled backward"). So compile goes with model.activation_budget_gib /
    # checkpoint_blocks / gradient_checkpointing=false; with every block checkpointed it is refused.
    # compile_trust_backward: true compiles the checkpointed blocks too; set it only after
    # scripts/bench/repro_compiled_backward.py passes on your torch and card.
    compile: bool = False
    compile_trust_backward: bool = False
    # compile_fullgraph: each block one graph (true) or dynamo may split it at graph breaks (false, as RL's).
    compile_fullgraph: bool = True
    attention_backend: str = "native"  # native (torch SDPA picks; fastest measured) | _native_flash | _native_efficient | _native_math
    # fp8 matmuls for the frozen base under LoRA (issue #17; etchr_sft/fp8.py): none | float8_rowwise |
    # float8_tensorwise (torchao float8 training recipes). LoRA A/B stay bf16. Needs torchao, a CUDA GPU of
    # compute capability >= 8.9 and lora.enabled=true; refused before loading otherwise. Not bit-identical.
    fp8: str = "none"


@dataclass
class LoraConfig:
    enabled: bool = True  # False = full fine-tuning (shard it: ZeRO-3 / FSDP for 9B)
    rank: int = 768  # reference: 768
    alpha: float = 768.0  # reference: 768 (scale alpha/rank = 1); recorded in every checkpoint
    targets: list = field(default_factory=lambda: list(REFERENCE_LORA_TARGETS))  # module-name suffixes
    single_blocks_to_out: bool = True  # also single_transformer_blocks.*.attn.to_out (reference: yes)
    dropout: float = 0.0


@dataclass
class DataConfig:
    csv: str = MISSING  # CSV with columns image (target), edit_image (input), prompt
    base_path: str = ""  # image paths in the CSV are relative to this folder ("" = the CSV's folder)
    max_pixels: int = 1048576  # pixels; targets are downscaled (never up) to at most this area
    multiple_of: int = 16  # pixels; target sides are floored to multiples of this
    reference_resize: str = "pipeline"  # pipeline (= inference preprocessing) | diffsynth (reference recipe)
    aspect_buckets: bool = True  # group same-size samples so batch_size > 1 works
    num_workers: int = 2  # dataloader workers per process
    cache_text_embeddings: bool = False  # encode each prompt once and keep it on disk
    cache_reference_latents: bool = False  # encode each reference image once and keep it on disk
    # Precomputed conditioning (issue #17; SFT.md): a folder written by SFT/precompute.py with every row's text
    # embeddings and target / reference latents. Set, the trainer reads them and never runs the text encoder
    # or VAE for training (both stay on the CPU; validation edits move them to the GPU while they run), and
    # stops (exit 2) if a row is missing or a setting / the encoders differ. "" = encode in the loop.
    precomputed_dir: str = ""
    precompute_batch_size: int = 8  # samples per text-encoder / VAE call in SFT/precompute.py, per GPU
    precompute_shard_batches: int = 64  # batches per shard file written by SFT/precompute.py


@dataclass
class OptimConfig:
    lr: float = 1e-4  # reference: 1e-4
    weight_decay: float = 0.01  # reference: 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables (the reference has none)
    schedule: str = "constant"  # constant | cosine (both with linear warmup)
    warmup_steps: int = 0  # optimizer steps
    fused: bool = False  # CUDA only: AdamW's fused kernel (one launch for all parameters; same update rule)


@dataclass
class TrainConfig:
    run_dir: str = "runs/sft"  # checkpoints, metrics.jsonl, validation images, config.yaml
    batch_size: int = 1  # samples per GPU per micro-step (reference: 1)
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 0  # optimizer steps; 0 = run `epochs` epochs
    epochs: int = 1
    seed: int = 42
    mixed_precision: str = "bf16"  # bf16 | no
    checkpoint_every: int = 1000  # optimizer steps; the final step is saved too (see save_final)
    save_final: bool = True  # save a checkpoint at the last step (False: benchmarks and smoke runs)
    keep_last: int = 3  # checkpoints kept (older ones are deleted)
    validate_every: int = 1000  # optimizer steps; 0 disables validation edits
    validation_items: int = 4  # the first N rows of the CSV, edited at every validation
    validation_steps: int = 28  # denoising steps of validation edits
    validation_guidance: float = 3.5  # CFG scale of validation edits
    log_every: int = 10  # optimizer steps
    # seconds between redraws of run_dir/curves.png (and always at the last step); 0 = at every log step.
    # A redraw is ~0.2-0.3 s of host time in which the GPU waits for the next step's kernels.
    curves_every_s: float = 60.0
    resume: str = "auto"  # auto (latest checkpoint in run_dir if any) | never | <checkpoint dir>
    timestep_lookup: str = "exact"  # exact | reference_bf16 (round t to bf16, nearest table entry)
    # seconds of training-loop wall time; 0 = no limit. Past it the run ends after the current optimizer
    # step as if max_steps were reached (final log, checkpoint, validation): time-boxed runs (scripts/nano).
    time_limit_s: float = 0.0


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: bool = False
    wandb_project: str = "etchr-sft"


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def split_cli(argv: list[str]) -> tuple[Optional[str], list[str]]:
    """`--config FILE a.b=c ...` -> (FILE, ["a.b=c", ...]). Anything else is an error."""
    config_path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a YAML path")
            config_path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: use --config FILE and key=value overrides")
        i += 1
    return config_path, overrides


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(exc).splitlines()[0]
    if key:
        return ConfigError(f"{source}: bad config key '{key}': {msg}")
    return ConfigError(f"{source}: {msg}")


def load_config(schema: type, yaml_path: Optional[str] = None, overrides: Optional[list[str]] = None,
                *, validate=None) -> DictConfig:
    """Schema defaults <- YAML file <- `a.b=c` overrides; typed, strict, with clear errors."""
    cfg = OmegaConf.structured(schema)
    if yaml_path is not None:
        if not os.path.isfile(yaml_path):
            raise ConfigError(f"config file not found: {yaml_path}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(yaml_path))
        except OmegaConfBaseException as exc:
            raise _explain(exc, yaml_path) from None
    if overrides:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as exc:
            raise _explain(exc, "command-line override") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        where = yaml_path or "the config"
        raise ConfigError(f"{where}: required value missing for key(s) {', '.join(missing)} "
                          f"(set it in the YAML or pass {missing[0]}=...)")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise _explain(exc, yaml_path or "config") from None
    if validate is not None:
        validate(cfg)
    return cfg


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def save_config(cfg: DictConfig, run_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config into the run dir (atomically)."""
    from .runtime import atomic_write_text

    path = Path(run_dir) / name
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


# ----------------------------------------------------------------------------------------------
# Validation beyond types: ranges and choices, with the fix in the message.
# ----------------------------------------------------------------------------------------------
def validate_sft(cfg: DictConfig) -> None:
    if cfg.model.dtype not in ("bf16", "fp32"):
        raise ConfigError(f"model.dtype={cfg.model.dtype!r}: use bf16 or fp32")
    if cfg.lora.enabled and (cfg.lora.rank < 1 or cfg.lora.alpha <= 0 or not cfg.lora.targets):
        raise ConfigError("lora: rank >= 1, alpha > 0 and a non-empty targets list are required")
    if cfg.data.reference_resize not in ("pipeline", "diffsynth"):
        raise ConfigError(f"data.reference_resize={cfg.data.reference_resize!r}: use pipeline or diffsynth")
    if cfg.data.multiple_of % 16:
        raise ConfigError(f"data.multiple_of={cfg.data.multiple_of}: must be a multiple of 16")
    if cfg.optim.schedule not in ("constant", "cosine"):
        raise ConfigError(f"optim.schedule={cfg.optim.schedule!r}: use constant or cosine")
    if cfg.train.mixed_precision not in ("bf16", "no"):
        raise ConfigError(f"train.mixed_precision={cfg.train.mixed_precision!r}: use bf16 or no")
    if cfg.train.time_limit_s < 0:
        raise ConfigError(f"train.time_limit_s={cfg.train.time_limit_s}: use 0 (no limit) or a number of seconds")
    if cfg.train.curves_every_s < 0:
        raise ConfigError(f"train.curves_every_s={cfg.train.curves_every_s}: use 0 (every log step) or a number of seconds")
    if cfg.data.precomputed_dir and (cfg.data.cache_text_embeddings or cfg.data.cache_reference_latents):
        raise ConfigError("data.precomputed_dir supersedes data.cache_text_embeddings / data.cache_reference_latents: "
                          "set those to false (the precomputed folder already holds every row's tensors)")
    if cfg.data.precompute_batch_size < 1 or cfg.data.precompute_shard_batches < 1:
        raise ConfigError("data.precompute_batch_size and data.precompute_shard_batches must be >= 1")
    if cfg.train.batch_size < 1 or cfg.train.grad_accum < 1:
        raise ConfigError("train.batch_size and train.grad_accum must be >= 1")
    if cfg.model.attention_backend in TRAINING_UNSAFE_ATTENTION_BACKENDS:
        raise ConfigError(f"model.attention_backend={cfg.model.attention_backend!r}: its backward pass crashed "
                          f"training on H200 with torch 2.11 (docs/PERFORMANCE.md); use native or _native_flash")
    if cfg.model.attention_backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"model.attention_backend={cfg.model.attention_backend!r}: use one of "
                          f"{', '.join(ATTENTION_BACKENDS)}")
    check_activation_keys(cfg.model)
    if cfg.model.fp8 not in ("none", "float8_rowwise", "float8_tensorwise"):
        raise ConfigError(f"model.fp8={cfg.model.fp8!r}: use none, float8_rowwise or float8_tensorwise")
    if cfg.train.timestep_lookup not in ("exact", "reference_bf16"):
        raise ConfigError(f"train.timestep_lookup={cfg.train.timestep_lookup!r}: use exact or reference_bf16")


def check_compiled_backward(model, device_type: str) -> None:
    """model.compile compiles only the blocks that are not checkpointed (a compiled block under the checkpoint
    wrapper trained on wrong LoRA gradients on an H200, torch 2.11: docs/PERFORMANCE.md, "Compiled
    backward"). A config that checkpoints every block would compile nothing: refused before anything loads,
    on every device (the same rule everywhere), unless model.compile_trust_backward=true, which compiles the
    checkpointed blocks too. `device_type` names the device in the message."""
    every_block = (model.checkpoint_blocks is None and model.gradient_checkpointing
                   and isinstance(model.activation_budget_gib, (int, float)) and float(model.activation_budget_gib) == 0)
    if model.compile and every_block and not model.compile_trust_backward:
        raise ConfigError(
            f"model.compile=true with every block checkpointed (model.gradient_checkpointing=true, no "
            f"model.activation_budget_gib or model.checkpoint_blocks) compiles nothing on {device_type}: compile "
            "skips checkpointed blocks, because a compiled block under the checkpoint wrapper gave wrong LoRA "
            "gradients on an H200 with torch 2.11 (2e7 x eager's largest gradient; docs/PERFORMANCE.md, "
            "\"Compiled backward\"). Leave blocks un-checkpointed with model.activation_budget_gib (e.g. 76 or "
            "auto), model.checkpoint_blocks=[n_double,n_single] or model.gradient_checkpointing=false; or, after "
            "scripts/bench/repro_compiled_backward.py reports matching gradients on your torch and card, set "
            "model.compile_trust_backward=true to compile the checkpointed blocks too.")


def check_activation_keys(model) -> None:
    """model.activation_budget_gib (a number >= 0 or "auto"), activation_budget_fraction, checkpoint_blocks."""
    b = model.activation_budget_gib
    ok = (isinstance(b, str) and b.strip().lower() == "auto") or (isinstance(b, (int, float)) and not
                                                                  isinstance(b, bool) and b >= 0)
    if not ok:
        raise ConfigError(f"model.activation_budget_gib={b!r}: use 0 (off), a number of GiB or auto")
    if not 0 < model.activation_budget_fraction <= 1:
        raise ConfigError(f"model.activation_budget_fraction={model.activation_budget_fraction}: use (0, 1]")
    cb = model.checkpoint_blocks
    if cb is not None and (len(cb) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                   for n in cb)):
        raise ConfigError(f"model.checkpoint_blocks={list(cb)}: use [n_double, n_single] (non-negative integers: "
                          "how many blocks of each stack are checkpointed) or null")


# ----------------------------------------------------------------------------------------------
# Paths: a relative path in the YAML or in a key=value override means the same file from any working
# directory: it resolves against the repository root (the checkout holding this tree). Absolute paths
# are kept; the resolved config (saved in the run dir) holds absolute paths.
# ----------------------------------------------------------------------------------------------
REPO_ROOT = Path(__file__).resolve().parents[2]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def repo_path(value: Optional[str], *, hub_id_ok: bool = False) -> Optional[str]:
    """`value` as an absolute path: relative -> REPO_ROOT / value. None and "" stay. With hub_id_ok, an
    "owner/name" that is no file or folder of the checkout is kept as a hub model id."""
    if not value or os.path.isabs(os.path.expanduser(value)):
        return os.path.expanduser(value) if value else value
    if hub_id_ok and _HUB_ID.fullmatch(value) and not (REPO_ROOT / value).exists():
        return value
    return os.path.normpath(REPO_ROOT / value)


def resolve_paths(cfg: DictConfig, fields: tuple, hub_fields: tuple = (), keep: tuple = ()) -> None:
    """Resolve the dotted `fields` of `cfg` in place (`hub_fields` may hold hub ids; values in `keep`,
    such as resume=auto, are words, not paths)."""
    for key in fields + hub_fields:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and value not in keep:
            OmegaConf.update(cfg, key, repo_path(value, hub_id_ok=key in hub_fields), merge=False)


def load_sft_config(yaml_path: Optional[str] = None, overrides: Optional[list[str]] = None) -> DictConfig:
    def resolve_then_validate(cfg: DictConfig) -> None:
        resolve_paths(cfg, ("data.csv", "data.base_path", "data.precomputed_dir", "train.run_dir", "train.resume"),
                      hub_fields=("model.pretrained_path",), keep=("auto", "never"))
        validate_sft(cfg)

    return load_config(SFTConfig, yaml_path, overrides, validate=resolve_then_validate)


# ----------------------------------------------------------------------------------------------
# --help: every key of the schema with its type, default and the comment beside it in this file.
# ----------------------------------------------------------------------------------------------
def _field_comments(cls: type) -> dict[str, str]:
    """field name -> the `# ...` comment on its line in the class body (the schema's documentation)."""
    import inspect
    import io
    import tokenize

    out: dict[str, str] = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return out
    last_name, last_line, above = None, -1, []  # `above`: a comment block on the lines before a field
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and last_line != tok.start[0]:
            last_name, last_line = tok.string, tok.start[0]
            if above:
                out[last_name] = " ".join(above)
                above = []
        elif tok.type == tokenize.COMMENT and tok.start[0] == last_line and last_name:
            out[last_name] = tok.string.lstrip("#").strip()
        elif tok.type == tokenize.COMMENT and tok.start[1] == 4:
            above.append(tok.string.lstrip("#").strip())
    return out


def schema_help(schema: type, prefix: str = "") -> list[str]:
    """One line per config key: `key (type, default): doc`, nested dataclasses flattened with dots."""
    import dataclasses
    import typing

    lines = []
    hints = typing.get_type_hints(schema)
    docs = _field_comments(schema)
    for f in dataclasses.fields(schema):
        tp = hints.get(f.name, f.type)
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        sub = tp if dataclasses.is_dataclass(tp) else (inner[0] if len(inner) == 1 and dataclasses.is_dataclass(inner[0])
                                                        else None)
        key = f"{prefix}{f.name}"
        args = typing.get_args(tp)
        if typing.get_origin(tp) is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
            lines.append(f"  {key}: {docs.get(f.name, '')}".rstrip())
            lines += schema_help(args[1], key + ".<name>.")
            continue
        if sub is not None:
            note = " (optional section; null = unset)" if sub is not tp else ""
            lines.append(f"  {key}:{note} {docs.get(f.name, '')}".rstrip())
            lines += schema_help(sub, key + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = "REQUIRED" if f.default is MISSING else repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "REQUIRED"
        if len(inner) == 1 and type(None) in typing.get_args(tp):
            name = f"{getattr(inner[0], '__name__', inner[0])} or null"
        else:
            name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        lines.append(f"  {key} ({name}, default {default}): {docs.get(f.name, '')}".rstrip(": "))
    return lines


def config_help(schema: type, usage: str) -> str:
    return usage.rstrip() + "\n\nconfig keys (set in the YAML or as key=value on the command line):\n" + \
        "\n".join(schema_help(schema)) + "\n"
