"""Evaluation config: the schema (dataclasses), loading (schema -> YAML -> CLI overrides), saving.

Every field has a default and a comment with its unit. Loading fails on an unknown key, a wrong type
or a missing required value with a message naming the key and the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and the file) and how to fix it."""


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------
# diffusers attention backends that need no extra package (torch SDPA with a fixed kernel).
ATTENTION_BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "_native_math")


# editor.preset -> the speed switches it sets (docs/PERFORMANCE.md, "bench_edit: presets" has the measured
# speed and fidelity of each; the values are the best measured combinations, 40 steps, CFG 3.5, 9B shape).
EDITOR_PRESETS = {
    "fast": {"quantize": "fp8", "compile": True, "cfg_batch": True, "step_cache": "taylorseer",
             "step_cache_interval": 3, "step_cache_warmup": 4},  # needs a GPU with fp8 (sm_89+) and torchao
    "fast_bf16": {"compile": True, "cfg_batch": True, "step_cache": "taylorseer",
                  "step_cache_interval": 3, "step_cache_warmup": 4},  # no torchao; any GPU
}


@dataclass
class EditorConfig:
    pipe_path: str = MISSING  # diffusers FLUX.2-klein pipeline dir (base, SFT-merged or RL-merged)
    lora_path: Optional[str] = None  # optional LoRA .safetensors on top (diffusers or DiffSynth naming)
    lora_scale: float = 1.0  # multiplier on top of the file's alpha/rank
    lora_alpha: Optional[float] = None  # only for LoRA files that do not record their alpha
    device: str = "auto"  # "auto" = cuda:LOCAL_RANK if available else cpu
    dtype: str = "auto"  # "auto" = bf16 on GPU, fp32 on CPU; or bf16 / fp16 / fp32
    steps: int = 40  # denoising steps (reference: 40)
    guidance: float = 3.5  # real CFG scale with "" as negative prompt (reference: 3.5)
    seed: int = 126  # base seed (reference: 126)
    per_item_seed: bool = True  # seed each item from (seed, item id); False = the same seed everywhere
    max_area: int = 1024 * 1024  # pixels; output area cap with the aspect ratio kept
    multiple_of: int = 16  # pixels; output sides are multiples of this
    size_mode: str = "keep_aspect"  # keep_aspect | reference_clamp (min(W,1024), min(H,1024) per side)
    max_sequence_length: int = 512  # text tokens (FLUX.2-klein pads to 512)
    # Speed options (docs/PERFORMANCE.md gives their measured speed and fidelity); all off = exact.
    compile: bool = False  # torch.compile the transformer's repeated blocks (regional compilation)
    step_cache: str = "none"  # none | taylorseer (diffusers TaylorSeer cache: extrapolates steps; approximate)
    step_cache_interval: int = 2  # taylorseer: a full forward every N steps, extrapolated in between
    step_cache_warmup: int = 4  # taylorseer: the first N steps are always computed in full
    cfg_batch: bool = False  # both CFG branches in one batch-2 forward (same math; with step_cache too)
    attention_backend: str = "native"  # native (torch SDPA picks) | _native_cudnn | _native_flash | _native_efficient | _native_math
    quantize: str = "none"  # none | fp8 (torchao float8 matmuls, per-row scales, dynamic activations; approximate)
    # A named bundle of the speed switches above (EDITOR_PRESETS: fast, fast_bf16), expanded into them at load
    # time, so --print-config, run.json and the edit-cache key show the explicit switches; null = none.
    preset: Optional[str] = None
    compile_cache_dir: Optional[str] = None  # compiled-kernel cache kept across runs (inductor + AOTAutograd); null = ~/.cache/etchr/inductor


@dataclass
class MLLMConfig:
    endpoints: list = field(default_factory=lambda: ["http://127.0.0.1:8000/v1"])  # OpenAI base URLs
    model: str = "Qwen/Qwen3-VL-8B-Instruct"  # model name sent in each request
    api_key_env: str = "ETCHR_MLLM_API_KEY"  # environment variable holding the key ("EMPTY" if unset)
    concurrency: int = 32  # requests in flight at once, over all endpoints
    timeout_s: float = 300.0  # seconds of wall clock per attempt, connect to last byte (a slow drip cannot extend it)
    connect_timeout_s: float = 10.0  # seconds to open the connection (capped at timeout_s)
    request_deadline_s: Optional[float] = None  # seconds per request over all attempts and waits; null = no cap
    max_retries: int = 3  # retries after the first try (network errors, 5xx, 429, malformed replies)
    backoff_s: float = 1.0  # seconds; doubles per retry
    retry_after_max_s: float = 60.0  # seconds; a 429/503 Retry-After is waited for, up to this
    temperature: float = 0.0  # verify and reason sampling temperature
    verify_max_tokens: int = 4096  # tokens
    reason_max_tokens: int = 4096  # tokens
    image_format: str = "png"  # png (lossless) | jpeg (the reference sends .jpg files, quality 75)
    jpeg_quality: int = 75  # used when image_format is jpeg


@dataclass
class TaskConfig:
    path: str = MISSING  # data file (parquet / jsonl) in the task's public schema
    limit: Optional[int] = None  # evaluate only the first N items


@dataclass
class ScoringConfig:
    frozenlake: str = "official"  # official (ThinkMorph: last \\boxed{R, D, ...}, upper case, commas) | lenient (words, runs, arrows, unboxed runs)
    verify_rule: str = "trimmed"  # trimmed (last \\boxed{} is "1" after stripping spaces) | reference (exactly "1")


@dataclass
class EvalConfig:
    run_dir: str = "runs/eval"  # results.jsonl, tables, report.html, config.yaml go here
    tasks: Dict[str, TaskConfig] = field(default_factory=dict)  # task name -> data (see the task registry)
    editor: EditorConfig = field(default_factory=EditorConfig)
    mllm: MLLMConfig = field(default_factory=MLLMConfig)
    judge: Optional[MLLMConfig] = None  # judge for judge-graded tasks (CharXiv); None = use mllm
    scoring: ScoringConfig = field(default_factory=ScoringConfig)  # answer-rule switches (see ScoringConfig)
    baseline: bool = True  # also score the no-edit baseline in the same run
    edit_cache_dir: Optional[str] = None  # None = <run_dir>/edit_cache; share it across runs
    retry_failed: bool = True  # a rerun retries items whose record is a failure
    # A run_dir belongs to one run (MLLM, editor, prompts, settings: etchr_eval/fingerprint.py). A rerun
    # with other settings stops naming them; namespace=auto (or a name) writes into <run_dir>/ns/<name>.
    namespace: Optional[str] = None
    max_failed_fraction: Optional[float] = None  # exit 3 when a task's failed/items exceeds it; None = only when all failed; 1.0 = never
    report_html: bool = True  # write report.html with thumbnails
    wandb: bool = False  # mirror metrics to wandb
    wandb_project: str = "etchr-eval"


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
def expand_preset(e: DictConfig) -> None:
    """editor.preset -> its switches, in place. A switch the user set to something else than both its default
    and the preset's value is a conflict (which one was meant?) and is refused, naming both."""
    if e.preset is None:
        return
    if e.preset not in EDITOR_PRESETS:
        raise ConfigError(f"editor.preset={e.preset!r}: use one of {', '.join(EDITOR_PRESETS)} or null")
    defaults = EditorConfig()
    for key, value in EDITOR_PRESETS[e.preset].items():
        if e[key] != value and e[key] != getattr(defaults, key):
            raise ConfigError(f"editor.preset={e.preset} sets editor.{key}={value!r}, but editor.{key}={e[key]!r} "
                              f"is set too: drop one of the two (or set preset=null and the switches yourself)")
        e[key] = value


def validate_eval(cfg: DictConfig) -> None:
    e = cfg.editor
    expand_preset(e)
    if cfg.scoring.frozenlake not in ("official", "lenient"):
        raise ConfigError(f"scoring.frozenlake={cfg.scoring.frozenlake!r}: use official or lenient")
    if cfg.scoring.verify_rule not in ("trimmed", "reference"):
        raise ConfigError(f"scoring.verify_rule={cfg.scoring.verify_rule!r}: use trimmed or reference")
    if e.size_mode not in ("keep_aspect", "reference_clamp"):
        raise ConfigError(f"editor.size_mode={e.size_mode!r}: use keep_aspect or reference_clamp")
    if e.dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"editor.dtype={e.dtype!r}: use auto, bf16, fp16 or fp32")
    if e.step_cache not in ("none", "taylorseer"):
        raise ConfigError(f"editor.step_cache={e.step_cache!r}: use none or taylorseer")
    if e.step_cache_interval < 1 or e.step_cache_warmup < 0:
        raise ConfigError("editor.step_cache_interval >= 1 and editor.step_cache_warmup >= 0 are required")
    if e.steps < 1:
        raise ConfigError(f"editor.steps={e.steps}: must be >= 1")
    if e.attention_backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"editor.attention_backend={e.attention_backend!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
    if e.quantize not in ("none", "fp8"):
        raise ConfigError(f"editor.quantize={e.quantize!r}: use none or fp8")
    if e.multiple_of < 16 or e.multiple_of % 16:
        raise ConfigError(f"editor.multiple_of={e.multiple_of}: must be a multiple of 16 (VAE 8x + 2x2 patch)")
    if e.max_area < 64 * 64:
        raise ConfigError(f"editor.max_area={e.max_area}: must be >= 4096 pixels (64x64)")
    for section in ("mllm",) + (("judge",) if cfg.judge is not None else ()):
        m = cfg[section]
        if not m.endpoints:
            raise ConfigError(f"{section}.endpoints is empty: list at least one OpenAI base URL")
        if m.image_format not in ("png", "jpeg"):
            raise ConfigError(f"{section}.image_format={m.image_format!r}: use png or jpeg")
        if m.concurrency < 1 or m.max_retries < 0 or m.timeout_s <= 0:
            raise ConfigError(f"{section}: concurrency >= 1, max_retries >= 0 and timeout_s > 0 are required")
        if m.connect_timeout_s <= 0 or m.retry_after_max_s < 0 or (m.request_deadline_s is not None
                                                                   and m.request_deadline_s <= 0):
            raise ConfigError(f"{section}: connect_timeout_s > 0, retry_after_max_s >= 0 and request_deadline_s > 0 "
                              f"(or null) are required (got {m.connect_timeout_s}, {m.retry_after_max_s}, "
                              f"{m.request_deadline_s})")
    if cfg.max_failed_fraction is not None and not 0.0 <= cfg.max_failed_fraction <= 1.0:
        raise ConfigError(f"max_failed_fraction={cfg.max_failed_fraction}: use a fraction in [0, 1] (1 = never exit 3) or null "
                          "(null: fail only when every item of a task failed)")
    for name, task in cfg.tasks.items():
        if task.limit is not None and task.limit < 1:
            raise ConfigError(f"tasks.{name}.limit={task.limit}: must be >= 1 or null")


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


def load_eval_config(yaml_path: Optional[str] = None, overrides: Optional[list[str]] = None) -> DictConfig:
    def resolve_then_validate(cfg: DictConfig) -> None:
        resolve_paths(cfg, ("run_dir", "edit_cache_dir", "editor.lora_path", "editor.compile_cache_dir")
                      + tuple(f"tasks.{name}.path" for name in cfg.tasks), hub_fields=("editor.pipe_path",))
        validate_eval(cfg)

    return load_config(EvalConfig, yaml_path, overrides, validate=resolve_then_validate)


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
