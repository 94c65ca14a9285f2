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
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
ROLLOUT_FREE_FRACTION = 0.8  # rl.rollout_memory_gb=null on CUDA: this share of the free device memory
ROLLOUT_CPU_GB = 2.0  # rl.rollout_memory_gb=null on CPU
# run.hardware: "<GPUs>x <card> <memory>GB", e.g. "8x H100 80GB" (lingshu_fast.plan knows the cards)
HARDWARE_PATTERN = re.compile(r"^\s*(\d+)\s*x\s*(A100|H100|H200)\s+(\d+(?:\.\d+)?)\s*GB\s*$", re.IGNORECASE)


class ConfigError(ValueError):
    """A user-facing configuration error; its message is one line."""


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric key (bounds None: open on that side). Floats must also be finite."""
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    hint: str = ""  # what a boundary value means, e.g. "0 keeps all"

    def allows(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        low = f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}" if self.gt is not None else ""
        high = f"<= {self.le:g}" if self.le is not None else f"< {self.lt:g}" if self.lt is not None else ""
        text = " and ".join(x for x in (low, high) if x) or "finite"
        return text + (f" ({self.hint})" if self.hint else "")


def num(default: Any = None, *, ge: Optional[float] = None, gt: Optional[float] = None, le: Optional[float] = None,
        lt: Optional[float] = None, hint: str = "") -> Any:
    """A numeric config key with its allowed range, checked wherever a value is set (recipe, override)
    and again by `validate`. Every int/float key is declared with `num` (a test enforces it)."""
    return field(default=default, metadata={"range": Range(ge, gt, le, lt, hint)})


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = "runs/default"
    seed: int = num(1234, ge=0, lt=2**63)
    log_every: int = num(1, ge=1)  # run.progress=false: print a plain progress line every this many steps
    progress: bool = True
    tensorboard: bool = False
    # the machine the recipe is sized for, e.g. "8x H100 80GB" (GPUs x card memory): `lingshu-fast plan`
    # checks the recipe's layout against it; documentation otherwise (training checks the real device)
    hardware: Optional[str] = None


@dataclass
class ModelConfig:
    # A local Hugging Face Qwen2.5-VL folder, or "tiny" for the embedded demo model.
    path: str = "tiny"
    # Previous stage's checkpoint to start from (overrides `path` weights when set).
    init_from: Optional[str] = None
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # the Qwen2.5-VL size, for `lingshu-fast plan` and the start-up memory check when model.path holds no
    # config.json (the package ships those configs: lingshu_fast/model/architectures)
    architecture: Optional[Literal["qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2.5-vl-32b", "qwen2.5-vl-72b"]] = None
    attention: Literal["auto", "flash", "varlen", "sdpa"] = "auto"
    # none | full (a layer keeps only its input) | selective (recompute the attention core and the MLP
    # activation); true/false are the deprecated full/none
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    checkpoint_every_k_layers: int = num(1, ge=1)  # the policy applies to every k-th decoder layer and ViT block
    freeze: list[str] = field(default_factory=list)  # any of: vision, merger, llm


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # JSONL files (messages or caption pairs)
    image_root: Optional[str] = None  # relative image paths resolve against this (else the JSONL's folder)
    tokenizer: str = "tiny"  # a local HF tokenizer folder, or "tiny"
    min_pixels: int = num(3136, gt=0)
    max_pixels: int = num(12845056, gt=0)
    max_length: int = num(8192, ge=1)
    max_tokens_per_microbatch: int = num(8192, ge=1)
    pack: bool = True
    shuffle_window: int = num(1024, ge=1)
    strict: bool = False
    system_prompt: Optional[str] = None
    # data worker processes per rank; null: the cores per local rank minus one (at most 8); 0: none
    num_workers: Optional[int] = num(None, ge=0, le=256, hint="null: the cores per local rank minus one")
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
    lr: float = num(1e-5, ge=0)
    lr_vision: Optional[float] = num(None, ge=0)  # defaults to lr
    lr_merger: Optional[float] = num(None, ge=0)  # defaults to lr
    weight_decay: float = num(0.0, ge=0)
    betas: tuple[float, float] = num((0.9, 0.999), ge=0, lt=1)  # each of the two
    eps: float = num(1e-8, gt=0)
    warmup_steps: int = num(100, ge=0)
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    min_lr_ratio: float = num(0.0, ge=0, le=1, hint="the final LR as a fraction of optim.lr")
    grad_clip: float = num(1.0, ge=0, hint="0 measures the gradient norm without clipping")
    # the distributed optimizer: gradients reduce-scattered over DP, each DP rank keeps a 1/DP shard of the
    # fp32 masters and Adam moments (2 + 4 + 12/DP bytes per bf16 parameter); null: on when DP > 1
    distributed: Optional[bool] = None
    zero1: Optional[bool] = None  # deprecated alias of optim.distributed
    overlap_param_gather: bool = False  # distributed: all-gather the updated shards during the next forward
    grad_accumulation_dtype: Literal["fp32", "param"] = "fp32"  # main gradients in fp32, or the parameter dtype


@dataclass
class TrainConfig:
    stage: int = num(3, ge=1, le=4, hint="the four Lingshu stages")
    # optimizer steps; null: every micro-batch of train.epochs epochs (and never more than those)
    max_steps: Optional[int] = num(None, ge=0, hint="null: train.epochs epochs")
    epochs: int = num(1, ge=1)
    # The global batch: micro-batches per step summed over all data-parallel ranks.
    global_microbatches: int = num(1, ge=1)
    max_consecutive_skips: int = num(5, ge=1)
    loss_z_weight: float = num(0.0, ge=0)
    label_smoothing: float = num(0.0, ge=0, lt=1)
    # the LM-head loss's gradient filtering (Cut Cross-Entropy's rule, an approximation): skip gradient
    # tiles whose probabilities are all below it; 0 = off, 0.000244140625 (2**-12) is CCE's bf16 choice
    loss_filter_eps: float = num(0.0, ge=0)
    # start-up memory check (lingshu_fast.plan): the layout's predicted peak against this many GB (GiB)
    # per device; null: the CUDA device's total memory (no check on CPU unless set)
    device_memory_gb: Optional[float] = num(None, gt=0)
    skip_memory_check: bool = False


@dataclass
class ParallelConfig:
    tp: int = num(1, ge=1)
    pp: int = num(1, ge=1)
    sequence_parallel: bool = False
    pp_schedule: Literal["1f1b", "interleaved", "gpipe"] = "1f1b"
    virtual_stages: int = num(1, ge=1)
    backend: Literal["auto", "nccl", "gloo"] = "auto"


@dataclass
class CheckpointConfig:
    every: int = num(0, ge=0, hint="0 saves only at the end")
    keep: int = num(2, ge=0, hint="0 keeps all")
    resume: bool = True
    # write the files in a background thread: the step loop stalls only while the tensors are gathered
    # into host memory; `async` in recipes and overrides (a Python keyword, hence the field's name)
    async_save: bool = False
    # When run.dir holds checkpoints but none of them loads, start from step 0 anyway (default: stop
    # with an error naming each checkpoint and why it failed)
    allow_fresh_start: bool = False


@dataclass
class RLConfig:
    num_generations: int = num(16, ge=1)
    rollout_batch: int = num(512, ge=1)
    max_new_tokens: int = num(1024, ge=1)
    temperature: float = num(1.0, gt=0)
    top_p: float = num(1.0, gt=0, le=1)
    beta: float = num(1e-3, ge=0, hint="0 drops the KL term and the reference model")
    clip_low: float = num(0.2, ge=0, lt=1)
    clip_high: float = num(0.2, ge=0)
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    updates_per_rollout: int = num(1, ge=1)
    filter_equal_groups: bool = False
    rewards: list[str] = field(default_factory=lambda: ["format:0.5", "accuracy:1.0"])
    reward_timeout_s: float = num(5.0, gt=0)
    backend: Literal["native", "vllm"] = "native"
    vllm_url: Optional[str] = None  # rl.backend=vllm: the server, e.g. http://localhost:8000
    vllm_sync_dir: Optional[str] = None  # rl.backend=vllm: the folder the server was started on (weights pushed there)
    # KV cache + sampling logits of one generation pass on a rank, GiB; the rollout runs in as many passes
    # as it needs. null: ROLLOUT_FREE_FRACTION of the GPU's free memory at rollout time (ROLLOUT_CPU_GB on CPU)
    rollout_memory_gb: Optional[float] = num(None, gt=0)
    vllm_timeout_s: float = num(600.0, gt=0)  # one HTTP request (a prompt's n samples), before a clear error


@dataclass
class EvalConfig:
    every: int = num(0, ge=0, hint="0 evaluates only at the end")
    # our JSONL files, release folders of the Lingshu suite, folders of them, or NAME=FOLDER
    benchmarks: list[str] = field(default_factory=list)
    max_new_tokens: int = num(256, ge=1)
    batch_size: int = num(8, ge=1)
    # medevalkit: MedEvalKit's rules per benchmark (comparable with Lingshu's table); lenient: ours
    scoring: Literal["medevalkit", "lenient"] = "medevalkit"
    reasoning: bool = False           # MedEvalKit's REASONING prompts (answer in \\boxed{})
    judge_url: Optional[str] = None   # OpenAI-compatible endpoint for open questions (off when null)
    judge_model: str = "gpt-4.1-2025-04-14"
    judge_timeout_s: float = num(60.0, gt=0, hint="total seconds per judge request, not per socket read")
    judge_api_key_env: Optional[str] = None  # the env variable whose value is sent as the API key


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


# documented key -> dataclass field, where the key is a Python keyword
_KEY_ALIASES = {("checkpoint", "async"): "async_save"}


# the old boolean switch of model.activation_checkpointing
_CHECKPOINTING_BOOLS = {True: "full", False: "none", "true": "full", "false": "none"}


def _old_checkpointing_value(value: Any, where: str) -> Any:
    mapped = _CHECKPOINTING_BOOLS.get(value.lower() if isinstance(value, str) else value)
    if mapped is None:
        return value
    print(f"lingshu-fast: {where}: model.activation_checkpointing={str(value).lower()} is deprecated; it means "
          f"{mapped!r} (choose none, full or selective)", file=sys.stderr)
    return mapped


def _apply(cfg: Config, section: str, key: str, value: Any, where: str) -> None:
    key = _KEY_ALIASES.get((section, key), key)
    if (section, key) == ("model", "activation_checkpointing"):
        value = _old_checkpointing_value(value, where)
    sections = _section_types(Config)
    if section not in sections:
        raise _unknown(section, list(sections), where, "section")
    sec_obj = getattr(cfg, section)
    keys = _section_types(type(sec_obj))
    if key not in keys:
        raise _unknown(key, list(keys), where, f"key in [{section}]")
    value = _coerce(value, keys[key], f"{where}: {section}.{key}")
    _check_range(value, _key_range(type(sec_obj), key), f"{section}.{key}", f"{where}: ")
    setattr(sec_obj, key, value)


def _key_range(section_cls, key: str) -> Optional[Range]:
    return next((f.metadata.get("range") for f in dataclasses.fields(section_cls) if f.name == key), None)


def _check_range(value: Any, allowed: Optional[Range], name: str, where: str = "") -> None:
    """ConfigError unless `value` (each element of a list/tuple; None passes) lies in `allowed`."""
    if allowed is None:
        return
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if v is not None and not allowed.allows(v):
            shown = list(value) if isinstance(value, tuple) else value
            raise ConfigError(f"{where}{name} must be {allowed.describe()}, got {shown}")


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
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"override {text!r}: cannot read the value {raw!r} ({problem}); write lists as "
                          f"[a.jsonl,b.jsonl] and close every bracket and quote") from None
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
    """Every numeric key's declared range (also for a Config built in code), then the deprecated
    aliases and the cross-key checks that a type alone cannot express."""
    for section in dataclasses.fields(cfg):
        body = getattr(cfg, section.name)
        for key in dataclasses.fields(body):
            _check_range(getattr(body, key.name), key.metadata.get("range"), f"{section.name}.{key.name}")
    if cfg.optim.zero1 is not None:
        if cfg.optim.distributed is not None and cfg.optim.distributed != cfg.optim.zero1:
            raise ConfigError(f"optim.zero1={cfg.optim.zero1} contradicts optim.distributed={cfg.optim.distributed}; "
                              f"optim.zero1 is a deprecated alias: set only optim.distributed")
        print("lingshu-fast: optim.zero1 is deprecated; it now means optim.distributed (the distributed "
              "optimizer: reduce-scattered gradients, sharded fp32 masters and Adam moments)", file=sys.stderr)
        cfg.optim.distributed, cfg.optim.zero1 = cfg.optim.zero1, None
    checks = [
        (cfg.data.max_pixels >= cfg.data.min_pixels, "data.max_pixels must be >= data.min_pixels"),
        (cfg.run.hardware is None or HARDWARE_PATTERN.match(cfg.run.hardware) is not None,
         f"run.hardware={cfg.run.hardware!r} must look like '8x H100 80GB' (GPUs x A100|H100|H200 memory GB)"),
        (cfg.eval.judge_api_key_env is None or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", cfg.eval.judge_api_key_env)
         is not None, "eval.judge_api_key_env must be an environment variable name (e.g. OPENAI_API_KEY)"),
        (cfg.eval.judge_url is None or cfg.eval.judge_url.startswith(("http://", "https://")),
         "eval.judge_url must be an http(s) URL (e.g. https://api.openai.com/v1)"),
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
