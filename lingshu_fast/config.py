"""Typed configuration: a YAML recipe plus `key=value` overrides, validated with one-line errors.

A recipe is a YAML mapping of sections (`run`, `model`, `data`, `train`, ...) to keys. Every key
has a declared type in the dataclasses below; anything else is a `ConfigError` that names the key,
where it came from (file or override) and what is allowed. `ConfigError` is caught by the CLI and
printed as one line, never a traceback.

Recipes may `inherit: other-recipe` (a name under lingshu_fast/recipes or a path) to share
settings; the child's keys win, section by section.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


class ConfigError(ValueError):
    """A user-facing configuration error; its message is one line."""


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = "runs/default"
    seed: int = 1234
    log_every: int = 1
    progress: bool = True
    tensorboard: bool = False


@dataclass
class ModelConfig:
    # A local Hugging Face Qwen2.5-VL folder, or "tiny" for the embedded demo model.
    path: str = "tiny"
    # Previous stage's checkpoint to start from (overrides `path` weights when set).
    init_from: Optional[str] = None
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    attention: Literal["auto", "flash", "varlen", "sdpa"] = "auto"
    activation_checkpointing: bool = False
    freeze: list[str] = field(default_factory=list)  # any of: vision, merger, llm


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # JSONL files (messages or caption pairs)
    image_root: Optional[str] = None  # relative image paths resolve against this (else the JSONL's folder)
    tokenizer: str = "tiny"  # a local HF tokenizer folder, or "tiny"
    min_pixels: int = 3136
    max_pixels: int = 12845056
    max_length: int = 8192
    max_tokens_per_microbatch: int = 8192
    pack: bool = True
    shuffle_window: int = 1024
    strict: bool = False
    system_prompt: Optional[str] = None
    # data worker processes per rank; null: the cores per local rank minus one (at most 8); 0: none
    num_workers: Optional[int] = None
    # where the data index files go; null: next to each JSONL (else ~/.cache/lingshu_fast/index)
    index_dir: Optional[str] = None
    # image paths must resolve inside data.image_root (or the JSONL's folder); null: on when image_root is set
    confine_images: Optional[bool] = None
    # how images travel to the device: "uint8" ships the resized bytes and normalises + patchifies
    # them there (image_pack kernel; 8x fewer bytes than float32 patches), "float32" packs on the
    # host; "auto": uint8 when CUDA is available
    image_transfer: Literal["auto", "uint8", "float32"] = "auto"


@dataclass
class OptimConfig:
    lr: float = 1e-5
    lr_vision: Optional[float] = None  # defaults to lr
    lr_merger: Optional[float] = None  # defaults to lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    zero1: bool = False


@dataclass
class TrainConfig:
    stage: int = 3
    # optimizer steps; null: every micro-batch of train.epochs epochs (and never more than those)
    max_steps: Optional[int] = None
    epochs: int = 1
    # The global batch: micro-batches per step summed over all data-parallel ranks.
    global_microbatches: int = 1
    max_consecutive_skips: int = 5
    loss_z_weight: float = 0.0
    label_smoothing: float = 0.0


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    pp_schedule: Literal["1f1b", "interleaved", "gpipe"] = "1f1b"
    virtual_stages: int = 1
    backend: Literal["auto", "nccl", "gloo"] = "auto"


@dataclass
class CheckpointConfig:
    every: int = 0  # 0: only at the end
    keep: int = 2
    resume: bool = True


@dataclass
class RLConfig:
    num_generations: int = 16
    rollout_batch: int = 512
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 1e-3
    clip_low: float = 0.2
    clip_high: float = 0.2
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    updates_per_rollout: int = 1
    filter_equal_groups: bool = False
    rewards: list[str] = field(default_factory=lambda: ["format:0.5", "accuracy:1.0"])
    reward_timeout_s: float = 5.0
    backend: Literal["native", "vllm"] = "native"
    vllm_url: Optional[str] = None  # rl.backend=vllm: the server, e.g. http://localhost:8000
    vllm_sync_dir: Optional[str] = None  # rl.backend=vllm: the folder the server was started on (weights pushed there)
    vllm_timeout_s: float = 600.0  # one HTTP request (a prompt's n samples), before a clear error


@dataclass
class EvalConfig:
    every: int = 0
    benchmarks: list[str] = field(default_factory=list)
    max_new_tokens: int = 256
    batch_size: int = 8
    judge_url: Optional[str] = None


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- coercion


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        return _type_name(args[0]) + " or null"
    if origin in (list, tuple):
        return f"a list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to `tp`, or raise ConfigError naming `where` and the allowed values."""
    origin = get_origin(tp)
    bad = ConfigError(f"{where}: {value!r} is not {_type_name(tp)}")
    if origin is Union:
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
            raise bad
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        allowed = get_args(tp)
        for a in allowed:
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        raise ConfigError(
            f"{where}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.strip("[]").split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise bad
        args = get_args(tp)
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, where) for v, a in zip(value, args))
        return [_coerce(v, args[0], where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: {value!r} is not a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise ConfigError(f"{where}: unsupported config type {tp}")


def _section_types(section_cls) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _unknown(name: str, allowed: list[str], where: str, kind: str) -> ConfigError:
    hint = difflib.get_close_matches(name, allowed, n=1)
    return ConfigError(
        f"{where}: unknown {kind} {name!r}"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
        + f"; allowed: {', '.join(allowed)}"
    )


def _apply(cfg: Config, section: str, key: str, value: Any, where: str) -> None:
    sections = _section_types(Config)
    if section not in sections:
        raise _unknown(section, list(sections), where, "section")
    sec_obj = getattr(cfg, section)
    keys = _section_types(type(sec_obj))
    if key not in keys:
        raise _unknown(key, list(keys), where, f"key in [{section}]")
    setattr(sec_obj, key, _coerce(value, keys[key], f"{where}: {section}.{key}"))


# --------------------------------------------------------------------------- loading


def resolve_recipe(recipe: str) -> Path:
    """A recipe is a YAML path, or a name under lingshu_fast/recipes (with or without .yaml)."""
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    named = RECIPES_DIR / f"{recipe}.yaml"
    if named.exists():
        return named
    if p.exists():
        return p
    names = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml"))
    hint = difflib.get_close_matches(recipe, names, n=1)
    raise ConfigError(
        f"recipe {recipe!r} is neither a YAML file nor a recipe name"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
        + f"; known recipes: {', '.join(names)}"
    )


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """The recipe's layers, base first: [(mapping, source_name), ...]."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: recipe inherits itself ({' -> '.join(map(str, seen))})")
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read recipe: {err.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    layers: list[tuple[dict, str]] = []
    parent = data.pop("inherit", None)
    if parent is not None:
        base = Path(parent) if Path(parent).is_absolute() else path.parent / str(parent)
        base_path = base if base.suffix in (".yaml", ".yml") and base.exists() else resolve_recipe(str(parent))
        layers.extend(_read_yaml(base_path, seen + (path,)))
    layers.append((data, str(path)))
    return layers


def parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.max_steps=10)")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.key (e.g. parallel.tp=2)")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return parts[0], parts[1], value


def load_config(recipe: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Build a Config from a recipe (name or path) and `section.key=value` overrides."""
    cfg = Config()
    if recipe is not None:
        for data, source in _read_yaml(resolve_recipe(recipe)):
            for section, body in data.items():
                if body is None:
                    continue
                if not isinstance(body, dict):
                    raise ConfigError(f"{source}: section {section!r} must be a mapping of keys")
                for key, value in body.items():
                    _apply(cfg, str(section), str(key), value, source)
    for text in overrides or []:
        section, key, value = parse_override(text)
        _apply(cfg, section, key, value, f"override {text!r}")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-key checks that a type alone cannot express."""
    checks = [
        (cfg.parallel.tp >= 1, "parallel.tp must be >= 1"),
        (cfg.parallel.pp >= 1, "parallel.pp must be >= 1"),
        (cfg.train.max_steps is None or cfg.train.max_steps >= 0,
         "train.max_steps must be >= 0, or null to train train.epochs epochs"),
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (cfg.data.num_workers is None or 0 <= cfg.data.num_workers <= 256,
         "data.num_workers must be in [0, 256], or null for the cores per local rank"),
        (cfg.data.max_length > 0, "data.max_length must be > 0"),
        (cfg.data.shuffle_window >= 1, "data.shuffle_window must be >= 1"),
        (cfg.checkpoint.every >= 0, "checkpoint.every must be >= 0 (0: only at the end)"),
        (cfg.data.min_pixels > 0, "data.min_pixels must be > 0"),
        (cfg.data.max_pixels >= cfg.data.min_pixels, "data.max_pixels must be >= data.min_pixels"),
        (cfg.data.max_tokens_per_microbatch > 0, "data.max_tokens_per_microbatch must be > 0"),
        (cfg.train.global_microbatches >= 1, "train.global_microbatches must be >= 1"),
        (0.0 <= cfg.rl.clip_low < 1.0, "rl.clip_low must be in [0, 1)"),
        (cfg.rl.clip_high >= 0.0, "rl.clip_high must be >= 0"),
        (cfg.rl.num_generations >= 1, "rl.num_generations must be >= 1"),
        (cfg.rl.vllm_timeout_s > 0, "rl.vllm_timeout_s must be > 0"),
        (cfg.rl.backend != "vllm" or bool(cfg.rl.vllm_url),
         "rl.backend=vllm needs rl.vllm_url (the vLLM server you started, e.g. http://localhost:8000)"),
        (cfg.rl.backend != "vllm" or bool(cfg.rl.vllm_sync_dir),
         "rl.backend=vllm needs rl.vllm_sync_dir (the folder the vLLM server was started on: weights are pushed there)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    allowed_groups = {"vision", "merger", "llm"}
    for g in cfg.model.freeze:
        if g not in allowed_groups:
            raise ConfigError(f"model.freeze: {g!r} is not a module group; choose from vision, merger, llm")
