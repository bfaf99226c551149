"""RL config: the schema (dataclasses), loading (schema -> YAML -> CLI overrides), saving.

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
# RL LoRA targets (PROTOCOL.md section 2): the SFT list without the single blocks' attn.to_out.
REFERENCE_REWARD_WEIGHTS = {"guidance": 0.5, "correctness": 0.5}
# diffusers attention backends (AttentionBackendName) that need nothing beyond PyTorch and have a backward.
ATTENTION_BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "_native_math")
CUDA_ONLY_ATTENTION_BACKENDS = ("_native_cudnn", "_native_flash", "_native_efficient")
HALF_ONLY_ATTENTION_BACKENDS = ("_native_cudnn", "_native_flash")  # bf16 / fp16 inputs only
# Refused for training: cuDNN attention's backward crashed the process in both training benchmarks (H200,
# torch 2.11.0+cu130: CUBLAS_STATUS_EXECUTION_FAILED, then illegal memory accesses; docs/PERFORMANCE.md).
TRAINING_UNSAFE_ATTENTION_BACKENDS = ("_native_cudnn",)
REFERENCE_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                          "to_add_out", "linear_in", "linear_out", "to_qkv_mlp_proj"]


@dataclass
class ModelConfig:
    pretrained_path: str = MISSING  # merged SFT pipeline dir (CHECKPOINTS.md)
    dtype: str = "bf16"  # bf16 | fp32
    gradient_checkpointing: bool = True
    # Activation memory by budget (issue #17, docs/PERFORMANCE.md): 0 = off (gradient_checkpointing decides:
    # every block or none). A number = the peak GiB a training forward + backward may reach on each GPU;
    # "auto" = activation_budget_fraction of the card's memory. Before the first iteration a probe at the
    # largest training shape (train.micro_batch transitions, a data.max_area / data.size target, an
    # activation_reference_pixels condition image, 512 text tokens) measures the peak with every block
    # checkpointed and the extra per un-checkpointed block; as many blocks as fit run without
    # checkpointing. Rollouts (no grad) are unaffected. CUDA only (refused on CPU: pin checkpoint_blocks).
    activation_budget_gib: Any = 0
    activation_budget_fraction: float = 0.9  # of the card's total memory, for activation_budget_gib=auto
    activation_reference_pixels: int = 1048576  # pixels; the largest condition image planned for (pipeline cap)
    # [n_double, n_single]: checkpoint the first n blocks of each stack (9B: 8 double, 24 single), run the
    # rest plainly; overrides the keys above. null = as they say.
    checkpoint_blocks: Optional[list] = None
    max_sequence_length: int = 512  # text tokens
    # Speed switches (docs/PERFORMANCE.md, bench_rl_group). compile: regional torch.compile of the
    # transformer blocks (rollout and training; not bit-identical to eager). Under gradient, a checkpointed
    # block runs (and recomputes) its eager forward: on an H200 with torch 2.11 a compiled block under the
    # checkpoint wrapper gave wrong LoRA gradients once LoRA B was non-zero (docs/PERFORMANCE.md, "Compiled
    # backward"; the earlier first-step check had B = 0). Plain blocks (model.activation_budget_gib,
    # checkpoint_blocks) and the no-grad rollouts run compiled.
    # attention_backend: diffusers'
    # attention dispatch for the transformer, one of ATTENTION_BACKENDS ("native" = torch SDPA's choice).
    compile: bool = False
    attention_backend: str = "native"
    # fp8 matmuls for the frozen base under LoRA (issue #17; etchr_rl/fp8.py): none | float8_rowwise |
    # float8_tensorwise (torchao recipes, the discarded weight gradient in bf16: fp8.float8_config), rollouts
    # and training alike; LoRA A/B stay bf16.
    # Needs torchao and a CUDA GPU of compute capability >= 8.9; refused before loading otherwise.
    fp8: str = "none"


@dataclass
class LoraConfig:
    rank: int = 64  # reference: 64
    alpha: float = 128.0  # reference: 128 (scale 2); recorded in every checkpoint
    targets: list = field(default_factory=lambda: list(REFERENCE_LORA_TARGETS))


@dataclass
class DataConfig:
    jsonl: str = MISSING  # prepared GRPO JSONL (RL/prepare_data.py)
    root: str = ""  # image paths are relative to this folder ("" = the JSONL's folder)
    resize: str = "keep_aspect"  # keep_aspect (as Evaluation) | center_crop (reference 720x720 square)
    max_area: int = 720 * 720  # pixels
    size: int = 720  # pixels; side of the square in center_crop mode


@dataclass
class SamplingConfig:
    group_size: int = 8  # G samples per prompt
    steps: int = 25  # S sampling steps
    shift: float = 3.0  # sigma_k = shift u / (1 + (shift - 1) u)
    eta: float = 0.7  # SDE noise level
    timestep_fraction: float = 0.6  # fraction of the S-1 transitions trained per sample (0.6 -> 14)
    guidance: float = 1.0  # no CFG during rollouts
    same_init_noise_in_group: bool = False  # True = one initial noise per group
    batch_group: bool = True  # sample a group as one batch when memory allows
    # Samples per rollout chunk (0 = the whole group at once). Chunks are sampled one after another and each
    # is scored by the judge as soon as it is decoded, so scoring chunk i overlaps sampling chunk i+1.
    rollout_chunk: int = 0


@dataclass
class JudgeConfig:
    endpoints: list = field(default_factory=lambda: ["http://127.0.0.1:8000/v1"])  # OpenAI base URLs
    model: str = "Qwen/Qwen3-VL-8B-Instruct"
    api_key_env: str = "ETCHR_JUDGE_API_KEY"  # environment variable holding the key
    concurrency: int = 64  # requests in flight at once
    timeout_s: float = 120.0  # seconds of wall clock per attempt, connect to last byte (a slow drip cannot extend it)
    connect_timeout_s: float = 10.0  # seconds to open the connection (capped at timeout_s)
    request_deadline_s: Optional[float] = None  # seconds per request over all attempts and waits; null = no cap
    max_retries: int = 3  # retries after the first try (network errors, 5xx, 429, malformed replies)
    backoff_s: float = 1.0  # seconds; doubles per retry
    retry_after_max_s: float = 60.0  # seconds; a 429/503 Retry-After is waited for, up to this
    max_failure_rate: float = 0.2  # abort when the judge fails on more than this fraction of a step
    drop_params: list = field(default_factory=list)  # sampling params not to send (transformers serve: [top_k])


@dataclass
class RewardConfig:
    # name -> weight. Empty = the reference's {guidance: 0.5, correctness: 0.5}. (Empty by default so that
    # weights given in a YAML or on the command line replace the set instead of merging into it.)
    weights: dict = field(default_factory=dict)
    correctness_images: str = "original_and_edited"  # original_and_edited | edited_only (reference)
    gdpo: bool = True  # renormalise advantages across all ranks
    adv_clip: float = 5.0
    guidance_answer_max_tokens: int = 1024  # tokens of the guidance reward's answer round (reference: 1024)
    jigsaw_psnr_db: float = 20.0  # jigsaw_restore: reward 1 iff PSNR(edit, target) >= this
    # Custom rewards: "module:function" or "path/to/file.py:function" entries (RL.md "Custom rewards"); each
    # registers a reward under its name, weighted like the built-ins by reward.weights.
    plugins: list = field(default_factory=list)


@dataclass
class OptimConfig:
    lr: float = 1e-5  # reference: 1e-5
    weight_decay: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0
    clip_range: float = 1e-4  # ratio clip epsilon
    kl_coef: float = 0.0  # KL to the LoRA-disabled model (0 = off, as the reference)


@dataclass
class TrainConfig:
    run_dir: str = "runs/rl"
    prompts_per_step: int = 1  # prompts (groups) per GPU per rollout phase
    grad_accum: int = 4  # reference: 4 (2 optimizer steps per group)
    # Transitions stacked in one training forward (within one prompt's samples of one accumulation window,
    # never across an optimizer step). The loss is the same sum as with 1 (the reference): gradients agree up
    # to float rounding.
    micro_batch: int = 1
    max_steps: int = 1000  # optimizer steps
    seed: int = 42
    checkpoint_every: int = 50  # optimizer steps; the final step is always saved
    keep_last: int = 3
    log_every: int = 1
    grid_every: int = 10  # iterations; save an edit grid with rewards (0 = never)
    resume: str = "auto"  # auto | never | <checkpoint dir>
    # seconds of training-loop wall time; 0 = no limit. Past it the run ends after the current iteration,
    # saving the final checkpoint as at max_steps: time-boxed runs (scripts/nano).
    time_limit_s: float = 0.0


@dataclass
class RLConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: bool = False
    wandb_project: str = "etchr-rl"


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
def validate_rl(cfg: DictConfig) -> None:
    s = cfg.sampling
    if s.group_size < 2:
        raise ConfigError(f"sampling.group_size={s.group_size}: GRPO needs >= 2 samples per group")
    if s.steps < 2 or not 0 < s.timestep_fraction <= 1:
        raise ConfigError("sampling.steps >= 2 and 0 < sampling.timestep_fraction <= 1 are required")
    if cfg.data.resize not in ("keep_aspect", "center_crop"):
        raise ConfigError(f"data.resize={cfg.data.resize!r}: use keep_aspect or center_crop")
    if cfg.reward.correctness_images not in ("original_and_edited", "edited_only"):
        raise ConfigError(f"reward.correctness_images={cfg.reward.correctness_images!r}: "
                          "use original_and_edited or edited_only")
    if not cfg.reward.weights:
        cfg.reward.weights = dict(REFERENCE_REWARD_WEIGHTS)
    if not cfg.judge.endpoints:
        raise ConfigError("judge.endpoints is empty: list at least one OpenAI base URL")
    if not 0 <= cfg.judge.max_failure_rate <= 1:
        raise ConfigError("judge.max_failure_rate must lie in [0, 1]")
    j = cfg.judge
    if j.connect_timeout_s <= 0 or j.retry_after_max_s < 0 or (j.request_deadline_s is not None
                                                               and j.request_deadline_s <= 0):
        raise ConfigError(f"judge: connect_timeout_s > 0, retry_after_max_s >= 0 and request_deadline_s > 0 (or null) "
                          f"are required (got {j.connect_timeout_s}, {j.retry_after_max_s}, {j.request_deadline_s})")
    if s.rollout_chunk < 0:
        raise ConfigError(f"sampling.rollout_chunk={s.rollout_chunk}: use 0 (the whole group at once) or a "
                          "positive number of samples per chunk")
    if cfg.train.time_limit_s < 0:
        raise ConfigError(f"train.time_limit_s={cfg.train.time_limit_s}: use 0 (no limit) or a number of seconds")
    if cfg.train.micro_batch < 1:
        raise ConfigError(f"train.micro_batch={cfg.train.micro_batch}: use >= 1 transitions per training forward")
    check_attention_backend(cfg.model.attention_backend, dtype=cfg.model.dtype)
    if cfg.model.fp8 not in ("none", "float8_rowwise", "float8_tensorwise"):
        raise ConfigError(f"model.fp8={cfg.model.fp8!r}: use none, float8_rowwise or float8_tensorwise")
    check_activation_keys(cfg.model)


def check_activation_keys(model) -> None:
    """model.activation_budget_gib (a number >= 0 or "auto"), activation_budget_fraction, checkpoint_blocks."""
    b = model.activation_budget_gib
    ok = (isinstance(b, str) and b.strip().lower() == "auto") or (isinstance(b, (int, float)) and not
                                                                  isinstance(b, bool) and b >= 0)
    if not ok:
        raise ConfigError(f"model.activation_budget_gib={b!r}: use 0 (off), a number of GiB or auto")
    if not 0 < model.activation_budget_fraction <= 1:
        raise ConfigError(f"model.activation_budget_fraction={model.activation_budget_fraction}: use (0, 1]")
    if model.activation_reference_pixels < 256:
        raise ConfigError(f"model.activation_reference_pixels={model.activation_reference_pixels}: use >= 256")
    cb = model.checkpoint_blocks
    if cb is not None and (len(cb) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                   for n in cb)):
        raise ConfigError(f"model.checkpoint_blocks={list(cb)}: use [n_double, n_single] (non-negative integers: "
                          "how many blocks of each stack are checkpointed) or null")


def check_attention_backend(backend: str, *, dtype: Optional[str] = None, device_type: Optional[str] = None) -> None:
    """model.attention_backend against what it needs: a known name, safe for training, bf16 weights
    (dtype, when known) and CUDA (device_type, when known)."""
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"model.attention_backend={backend!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
    if backend in TRAINING_UNSAFE_ATTENTION_BACKENDS:
        raise ConfigError(f"model.attention_backend={backend!r}: its backward pass crashed training on H200 with "
                          f"torch 2.11 (docs/PERFORMANCE.md); use native (the fastest measured) or _native_flash")
    if dtype is not None and backend in HALF_ONLY_ATTENTION_BACKENDS and dtype != "bf16":
        raise ConfigError(f"model.attention_backend={backend!r} needs bf16 weights (model.dtype={dtype!r}); "
                          "use native or _native_math in fp32")
    if device_type is not None and backend in CUDA_ONLY_ATTENTION_BACKENDS and device_type != "cuda":
        raise ConfigError(f"model.attention_backend={backend!r} runs on CUDA only (the model is on "
                          f"{device_type}); use native or _native_math")


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


def load_rl_config(yaml_path: Optional[str] = None, overrides: Optional[list[str]] = None) -> DictConfig:
    def resolve_then_validate(cfg: DictConfig) -> None:
        resolve_paths(cfg, ("data.jsonl", "data.root", "train.run_dir", "train.resume"),
                      hub_fields=("model.pretrained_path",), keep=("auto", "never"))
        validate_rl(cfg)

    return load_config(RLConfig, yaml_path, overrides, validate=resolve_then_validate)


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
