"""One typed config tree for every entry point: dataclasses, filled from YAML, then `key=value` overrides.

Why a hand-rolled loader: the tree is small, and we want errors that name the exact dotted key
(`model.d_modle: unknown key; did you mean d_model?`) and reject bad types before any rank starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from data_pipeline.config import DataConfig
from models.config import SimMTMConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the key."""


def repo_path(path: str, anchor: bool = False) -> str:
    """Where a relative path in a config points: as given when it exists from here (URLs and absolute
    paths always), else under the repository (the bundled data/ETTh1.csv, cluster/ds_config.json, the
    foundation model), so every command works from any directory. `anchor`: always under the
    repository (folders a run writes, such as the shard cache; what evaluation stages, which run in
    the repository, read)."""
    if "://" in path or Path(path).is_absolute():
        return path
    if anchor or (not Path(path).exists() and (REPO_ROOT / path).exists()):
        return str(REPO_ROOT / path)
    return path


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 1  # linear from 0; DeepSpeed's WarmupCosineLR needs >= 1
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 0.0  # 0 disables clipping
    # warmup_cosine: linear warmup (warmup_steps), then cosine over the run, per step (DeepSpeed's
    # WarmupCosineLR). epoch_cosine: the authors' pre-training schedule, constant within an epoch and
    # cosine over epochs down to lr * min_lr_ratio, no warmup (with train.max_steps: over
    # ceil(max_steps / steps_per_epoch) epochs).
    schedule: Literal["warmup_cosine", "epoch_cosine"] = "warmup_cosine"

    def validate(self) -> None:
        import math

        for k in ("lr", "weight_decay", "min_lr_ratio", "grad_clip"):  # NaN/inf pass every < / > check
            if not math.isfinite(getattr(self, k)):
                raise ValueError(f"{k} must be a finite number, got {getattr(self, k)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for i, b in enumerate(self.betas):
            if not (math.isfinite(b) and 0.0 <= b < 1.0):
                raise ValueError(f"betas[{i}] must be in [0, 1), got {b}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")


@dataclass
class TrainConfig:
    batch_size: int = 16  # windows per rank per micro-step
    grad_accum: int = 1
    epochs: int = 50
    max_steps: int = 0  # > 0: stop after this many optimizer steps (overrides epochs)
    seed: int = 2023
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    log_every: int = 10
    progress: bool = True
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    # Validation loss every K optimizer steps (and at the last step); 0 = off. The same data.source,
    # split `val_split`, not shuffled: the first `val_batches` batches (per rank: its share of them),
    # masked with a fixed seed, so every validation scores exactly the same windows and views.
    val_every: int = 0
    val_batches: int = 8
    val_split: Literal["train", "val", "test"] = "val"
    # A non-finite loss or gradient norm: stop (name the step and the last good checkpoint; nothing
    # non-finite is saved) or skip_step (no update, counted; stop after max_nonfinite_in_row in a row).
    on_nonfinite: Literal["stop", "skip_step"] = "stop"
    max_nonfinite_in_row: int = 10
    # torch.compile the model (inductor, default mode; the first steps pay the compilation). Not
    # max-autotune: it benchmarks kernels for minutes. No CUDA graphs (reduce-overhead): the forward
    # breaks its graph at the mask generator, gathers across ranks inside autograd and runs between
    # DeepSpeed's hooks, so captured pieces would be many and small. scripts/gpu_check.sh measures it.
    compile: bool = False

    def validate(self) -> None:
        for k in ("batch_size", "grad_accum", "log_every", "max_nonfinite_in_row"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("epochs", "max_steps", "num_threads"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.epochs == 0 and self.max_steps == 0:
            raise ValueError("epochs and max_steps are both 0: nothing to train (set epochs >= 1 or max_steps >= 1)")
        if not 0 <= self.seed < 2 ** 32:  # numpy's seeding range; torch and DeepSpeed accept it too
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.val_every < 0:
            raise ValueError(f"val_every must be >= 0 (0 = off), got {self.val_every}")
        if self.val_batches < 1:
            raise ValueError(f"val_batches must be >= 1, got {self.val_batches}")


@dataclass
class DistConfig:
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    deepspeed: bool = False  # wrap the model in a DeepSpeed engine
    ds_config: str = "cluster/ds_config.json"
    zero_stage: int = -1  # -1 keeps the JSON's value
    global_constraint: bool = True  # all-gather series representations for the constraint loss
    global_aggregation: bool = False  # aggregate over the global batch (gathers point-wise values too)

    def validate(self) -> None:
        if self.zero_stage not in (-1, 0, 1, 2, 3):
            raise ValueError(f"zero_stage must be -1 (keep the JSON's value), 0, 1, 2 or 3, got {self.zero_stage}")
        if not self.backend:
            raise ValueError("backend must be auto or a torch.distributed backend (nccl, gloo, ...)")
        if not self.ds_config:
            raise ValueError("ds_config must name a DeepSpeed JSON file")


@dataclass
class CheckpointConfig:
    dir: str = "runs/etth1"
    every: int = 0  # save every K steps; 0 saves only at the end
    keep: int = 3
    # none: a new run (refused if ckpt.dir already holds another run's checkpoints, unless overwrite);
    # auto: continue from the newest checkpoint in ckpt.dir (or start if there is none);
    # <checkpoint folder>: continue from that one; an older one of this run starts a new branch
    # (the newer checkpoints move to checkpoints/abandoned/<time>_after_<tag>/, never deleted)
    resume: str = "none"
    overwrite: bool = False  # start over in a folder holding a run (also with resume=auto): its outputs are removed
    # Write the optimizer state (2x the weights with Adam) only with checkpoints at multiples of
    # every * K steps and the final one; the others hold fp32 weights only (for evaluation and
    # publishing, not for resuming), so a long run's disk use stays near keep x the weights' size.
    save_optimizer_every: int = 0
    remote: str = ""  # mirror every complete checkpoint to this fsspec URL (s3://...); resume=auto reads it too
    storage_options: dict = field(default_factory=dict)  # fsspec options for `remote` and `publish` URLs
    publish: str = ""  # publish the final checkpoint to this folder/URL at the end of the run
    publish_heads: bool = True  # include projector and decoder in the published weights
    # which checkpoint `publish` gets: best = the one with the lowest validation loss (the `best`
    # pointer, kept whatever ckpt.keep) when the run validated (train.val_every > 0), else the last;
    # last = always the final checkpoint
    publish_from: Literal["best", "last"] = "best"

    def validate(self) -> None:
        if self.every < 0:
            raise ValueError(f"every must be >= 0 (0 saves only at the end), got {self.every}")
        if self.keep < 0:
            raise ValueError(f"keep must be >= 0 (0 keeps every checkpoint), got {self.keep}")
        if self.save_optimizer_every < 0:
            raise ValueError(f"save_optimizer_every must be >= 0 (0: every checkpoint), got {self.save_optimizer_every}")
        if not self.dir:
            raise ValueError("dir must name the run folder")
        if not self.resume:
            raise ValueError("resume must be none, auto or a checkpoint folder")


@dataclass
class LogConfig:
    tensorboard: bool = True
    image_every: int = 100

    def validate(self) -> None:
        if self.image_every < 0:
            raise ValueError(f"image_every must be >= 0, got {self.image_every}")


@dataclass
class Config:
    name: str = "simmtm"
    model: SimMTMConfig = field(default_factory=SimMTMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ----------------------------------------------------------------------------- coercion

def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}: unknown key{hint} (known: {', '.join(names)})")
        kwargs[k] = _coerce(v, hints[k], key)
    obj = cls(**{k: v for k, v in kwargs.items() if not dataclasses.is_dataclass(hints[k])})
    for k, v in kwargs.items():
        if dataclasses.is_dataclass(hints[k]):
            setattr(obj, k, v)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as e:
            raise ConfigError(f"{prefix or 'config'}: {e}") from None
    return obj


def _merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. train.batch_size=8)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def to_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def load_config(path: Optional[str | Path] = None, overrides: list[str] | tuple[str, ...] = (),
                cls: type = Config) -> Any:
    """Defaults <- YAML file <- overrides, then type-checked and validated as one tree."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        _merge(tree, loaded)
    for ov in overrides:
        keys, value = parse_override(ov)
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {k} is not a section")
        node[keys[-1]] = value
    return _build(cls, tree)


def split_cli(argv: list[str]) -> tuple[Optional[str], list[str]]:
    """`[--config FILE] [key=value ...]`; launcher-injected `--local_rank=N` is tolerated and dropped."""
    path, overrides = None, []
    it = iter(argv)
    for a in it:
        if a == "--config":
            path = next(it, None)
            if path is None:
                raise ConfigError("--config needs a file")
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a.startswith("--local_rank") or a.startswith("--local-rank"):
            if "=" not in a:
                next(it, None)
        else:
            overrides.append(a)
    return path, overrides


# ----------------------------------------------------------------------------- help

def config_help(cls: type = Config) -> str:
    """Every key of the tree `cls`, one per line: `key  type  default  # comment`. The entry points'
    `--help` prints this, generated from the dataclasses (the defaults as that entry point sets them,
    each field's trailing comment), so it lists exactly what load_config accepts."""
    rows: list[tuple[str, str, str, str]] = []
    _help_rows(cls, cls(), "", rows)
    w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
    indent = " " * (w0 + w1 + 8)  # a long comment continues under the defaults column
    return "\n".join(f"  {k:<{w0}}  {t:<{w1}}  {d}" + (
        "\n" + textwrap.fill(c, 110, initial_indent=indent + "# ", subsequent_indent=indent + "  ")
        if len(d) + len(c) > 60 else f"  # {c}" if c else "") for k, t, d, c in rows)


def _help_rows(cls: type, obj: Any, prefix: str, rows: list) -> None:
    """Append cls's keys; obj holds the defaults, or None for a list item's class (its field defaults)."""
    hints = typing.get_type_hints(cls)
    notes = _field_comments(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        value = getattr(obj, f.name) if obj is not None else _field_default(f)
        if dataclasses.is_dataclass(tp):
            _help_rows(tp, value, key + ".", rows)
            continue
        default = "(required)" if value is dataclasses.MISSING else json.dumps(value)
        rows.append((key, _type_name(tp), default, notes.get(f.name, "")))
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
        if dataclasses.is_dataclass(item):  # a list of sections (e.g. a suite's tasks): each item's keys
            _help_rows(item, None, key + "[].", rows)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return "|".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return "[" + ", ".join("..." if a is Ellipsis else _type_name(a) for a in args) + "]"
    if origin is list:
        return f"[{_type_name(args[0]) if args else 'any'}, ...]"
    if tp is dict or origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _field_comments(cls: type) -> dict[str, str]:
    """{field: its comment} from the class source: the `#` lines just above it, then its trailing
    `# comment`; empty when the source is unavailable."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    notes, block = {}, []
    for line in src.splitlines():
        if re.match(r"^    #", line):
            block.append(line.strip()[1:].strip())
            continue
        m = re.match(r"^    (\w+): [^#\n]*(?:#\s*(.+))?$", line)
        if m:
            text = " ".join(block + ([m.group(2)] if m.group(2) else []))
            if text:
                notes[m.group(1)] = text
        block = []
    return notes
