"""Typed run configuration: one dataclass per section, loaded from YAML recipes with ``key=value`` overrides.

A recipe is either nested (``optim: {lr: 0.001}``) or, for the zoo's ImageNet recipes, flat (``lr: 0.001``);
:data:`FLAT_KEYS` maps the flat names onto the nested fields. Overrides use dotted keys and YAML values::

    dsnet train --config configs/fashion_mnist/dsnet_tiny.yaml --set optim.lr=0.002 --set sched.epochs=3

Unknown keys raise :class:`~dsnet.errors.DSNetError` naming the key and the valid ones; so do values out of their
allowed range (:data:`RUN_RANGES`, checked after the recipe and the overrides are applied) and YAML syntax errors
(with the file, line and column).

Example:
    >>> cfg = load_config(None, ["model.name=resnet18", "optim.lr=0.01"])
    >>> cfg.model.name, cfg.optim.lr
    ('resnet18', 0.01)
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsnet.errors import DSNetError
from dsnet.models import list_zoo
from dsnet.models.dsnet import MIN_INPUT_SIZE

__all__ = [
    "FLAT_KEYS",
    "LOOP_RANGES",
    "RUN_RANGES",
    "Bound",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "SchedConfig",
    "TrainConfig",
    "check_loop_rules",
    "check_ranges",
    "coerce_value",
    "load_config",
    "load_typed_config",
    "model_min_input",
    "read_yaml",
    "set_value",
    "valid_keys",
]


@dataclass
class ModelConfig:
    """The network."""

    name: str = "dsnet_tiny"  # any timm model name (dsnet registers its zoo into timm on import)
    num_classes: int | None = None  # None: the number of classes of the dataset
    in_chans: int = 3  # 3: grey images are replicated to RGB; 1: grey images are fed as they are
    drop_path: float = 0.1  # stochastic depth rate of the last block
    drop_rate: float = 0.0  # dropout before the classifier
    init_weights: str | None = None  # .safetensors to start from (e.g. converted weights); the head may differ
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of timm.create_model


@dataclass
class DataConfig:
    """Datasets, augmentation and label mixing."""

    # "imagefolder" (root/train, root/val class folders), "fashion_mnist", or "wds": WebDataset shards in root, the
    # splits named by train_split/val_split as in _info.json or "train-{0000..0003}.tar|<samples>" (timm's reader)
    dataset: str = "imagefolder"
    root: str | None = None  # dataset folder; None for fashion_mnist searches the default locations
    train_split: str = "train"  # sub-folder of root with the training images (imagefolder)
    val_split: str = "val"  # sub-folder of root with the validation images (imagefolder)
    input_size: int = 224  # square training and evaluation resolution
    crop_pct: float = 0.875  # evaluation: resize to input_size / crop_pct, then center-crop input_size
    interpolation: str = "bicubic"  # resize interpolation ("bicubic", "bilinear", "random")
    mean: tuple[float, ...] | None = None  # normalisation mean per channel; None: ImageNet (or dataset) default
    std: tuple[float, ...] | None = None  # normalisation std per channel; None: ImageNet (or dataset) default
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)  # RandomResizedCrop aspect ratio range
    hflip: float = 0.5  # horizontal flip probability
    aa: str | None = "rand-m9-mstd0.5-inc1"  # timm auto-augment policy; None disables it
    color_jitter: float = 0.4  # colour jitter strength, used only when aa is None (timm's default)
    reprob: float = 0.25  # random erasing probability
    mixup: float = 0.8  # mixup alpha; 0 disables
    cutmix: float = 1.0  # cutmix alpha; 0 disables
    mixup_prob: float = 1.0  # probability of mixing a batch at all
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    label_smoothing: float = 0.1  # label smoothing (folded into the mixed targets when mixing)
    workers: int = 4  # DataLoader worker processes per rank (data.pipeline=pil)
    # "pil": per-image timm transforms in DataLoader workers (any dataset, every augmentation); "tensor": the whole
    # training set in memory as uint8, RandomResizedCrop + flip per batch on tensors (fashion_mnist only;
    # no aa, color_jitter or reprob)
    pipeline: str = "pil"
    max_train_samples: int | None = None  # use only the first N training samples (quick runs, tests)
    max_val_samples: int | None = None  # use only the first N validation samples


@dataclass
class OptimConfig:
    """Optimizer (timm.optim.create_optimizer_v2)."""

    opt: str = "adamw"  # optimizer name understood by timm
    lr: float = 1e-3  # learning rate at a global batch of lr_base_batch
    lr_base_batch: int = 1024  # lr is scaled by global_batch / lr_base_batch; 0 uses lr as it is
    weight_decay: float = 0.05  # decoupled weight decay; never applied to 1-D params (norms, biases)
    momentum: float = 0.9  # SGD momentum (ignored by AdamW)
    betas: tuple[float, float] | None = None  # Adam betas; None: timm's default (0.9, 0.999)
    eps: float | None = None  # Adam epsilon; None: timm's default (1e-8)
    clip_grad: float | None = None  # clip the global gradient norm to this value; None: no clipping


@dataclass
class SchedConfig:
    """Learning-rate schedule (timm.scheduler.create_scheduler_v2), stepped after every optimizer update."""

    sched: str = "cosine"  # schedule name understood by timm
    epochs: int = 300  # training epochs
    updates: int | None = None  # total optimizer updates instead (schedule length; the last epoch may be partial)
    minutes: float | None = None  # train this long instead (evaluation excluded): dsnet.engine.budget
    warmup_epochs: float = 5  # linear warm-up length from warmup_lr (may be fractional)
    warmup_lr: float = 1e-6  # learning rate at the first update
    min_lr: float = 1e-5  # final learning rate of the cosine


@dataclass
class TrainConfig:
    """The loop: batch, precision, devices, checkpoints and logs (the same keys for every task)."""

    batch_size: int = 1024  # GLOBAL batch per optimizer update (summed over ranks and accumulation steps)
    accum_steps: int = 1  # micro-batches accumulated per optimizer update
    seed: int = 0  # seed of initialisation, data order, augmentation and stochastic depth
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    amp: str = "auto"  # "auto" (bf16 on cuda with bf16, else off), "native" (also bf16 on CPUs with AVX512-BF16/AMX),
    # "none", "bf16", "fp16" (cuda); see dsnet.engine.runtime.resolve_amp
    channels_last: bool = False  # NHWC memory format
    compile: bool = False  # torch.compile the model
    threads: int | None = None  # torch CPU threads per rank; None: the cores not busy now, see auto_threads
    ema: float = 0.0  # model EMA decay (timm ModelEmaV3); 0 disables EMA
    eval_ema: bool = True  # when EMA is on, also evaluate the EMA weights and pick "best" on the better
    output_dir: str = "runs"  # parent folder of run folders
    name: str | None = None  # run name; None: "<model>-<dataset>"; the folder is <name>-<timestamp>
    log_interval: int = 50  # optimizer updates between step records in metrics.jsonl
    ckpt_interval: int = 0  # also checkpoint "last" every N optimizer updates (mid-epoch); 0: per epoch only
    eval_interval: int = 1  # evaluate every N epochs (and always after the last)
    max_bad_files: int | None = None  # abort when more unreadable images were skipped; None: never
    progress: bool = True  # progress bars (rank 0)
    sync_bn: bool = False  # BatchNorm statistics over all processes (torch's SyncBatchNorm; CUDA, several processes)


@dataclass
class RunConfig:
    """A whole run; :func:`load_config` builds it, ``dataclasses.asdict`` saves it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON serialisable)."""
        return _plain(dataclasses.asdict(self))


#: EMA decay used when a recipe says ``ema: true`` (DeiT's ``model_ema_decay``).
DEFAULT_EMA_DECAY = 0.99996

#: Flat recipe keys (timm/DeiT style, used by configs/imagenet/*.yaml) → nested field.
FLAT_KEYS: dict[str, str] = {
    "model": "model.name",
    "epochs": "sched.epochs",
    "batch_size": "train.batch_size",
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "warmup_epochs": "sched.warmup_epochs",
    "warmup_lr": "sched.warmup_lr",
    "min_lr": "sched.min_lr",
    "label_smoothing": "data.label_smoothing",
    "smoothing": "data.label_smoothing",
    "mixup": "data.mixup",
    "cutmix": "data.cutmix",
    "drop_path": "model.drop_path",
    "aa": "data.aa",
    "reprob": "data.reprob",
    "input_size": "data.input_size",
    "crop_pct": "data.crop_pct",
    "interpolation": "data.interpolation",
    "ema": "train.ema",
    "opt": "optim.opt",
    "clip_grad": "optim.clip_grad",
}


@dataclass(frozen=True)
class Bound:
    """The allowed interval of a numeric config value (``None``: unbounded on that side)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: ``low`` itself is not allowed
    high_open: bool = False  # True: ``high`` itself is not allowed

    def __contains__(self, value: float) -> bool:
        if value != value:  # NaN is in no range
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}" if self.high is not None else "any number"


POSITIVE_INT = Bound(1)  # counts that must be at least 1: batch sizes, epochs, intervals
NON_NEGATIVE = Bound(0)  # 0 meaning "off" or "none" is allowed
POSITIVE = Bound(0, low_open=True)  # rates, sizes
PROBABILITY = Bound(0, 1)
UNIT_OPEN = Bound(0, 1, high_open=True)  # drop rates, decays: 1 would drop everything / never move

#: Allowed values of every numeric field of :class:`RunConfig` (``None`` values are not checked).
RUN_RANGES: dict[str, Bound] = {
    "model.num_classes": POSITIVE_INT,
    "model.in_chans": POSITIVE_INT,
    "model.drop_path": UNIT_OPEN,
    "model.drop_rate": UNIT_OPEN,
    "data.input_size": POSITIVE_INT,
    "data.crop_pct": Bound(0, 1, low_open=True),
    "data.std": POSITIVE,
    "data.scale": Bound(0, 1, low_open=True),
    "data.ratio": POSITIVE,
    "data.hflip": PROBABILITY,
    "data.color_jitter": NON_NEGATIVE,
    "data.reprob": PROBABILITY,
    "data.mixup": NON_NEGATIVE,
    "data.cutmix": NON_NEGATIVE,
    "data.mixup_prob": PROBABILITY,
    "data.mixup_switch_prob": PROBABILITY,
    "data.label_smoothing": UNIT_OPEN,
    "data.workers": NON_NEGATIVE,
    "data.max_train_samples": POSITIVE_INT,
    "data.max_val_samples": POSITIVE_INT,
    "optim.lr": POSITIVE,
    "optim.lr_base_batch": NON_NEGATIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.momentum": Bound(0, 1, high_open=True),
    "optim.betas": Bound(0, 1, high_open=True),
    "optim.eps": POSITIVE,
    "optim.clip_grad": POSITIVE,
    "sched.epochs": POSITIVE_INT,
    "sched.updates": POSITIVE_INT,
    "sched.minutes": POSITIVE,
    "sched.warmup_epochs": NON_NEGATIVE,
    "sched.warmup_lr": NON_NEGATIVE,
    "sched.min_lr": NON_NEGATIVE,
    "train.batch_size": POSITIVE_INT,
    "train.accum_steps": POSITIVE_INT,
    "train.seed": NON_NEGATIVE,
    "train.threads": POSITIVE_INT,
    "train.ema": Bound(0, 1, high_open=True),
    "train.log_interval": POSITIVE_INT,
    "train.ckpt_interval": NON_NEGATIVE,
    "train.eval_interval": POSITIVE_INT,
    "train.max_bad_files": NON_NEGATIVE,
}


def check_ranges(cfg: Any, ranges: typing.Mapping[str, Bound], where: str = "config") -> None:
    """Raise DSNetError for the first ``section.key`` of ``cfg`` whose value (or an item of it) is out of range."""
    for dotted, bound in ranges.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if item is not None and item not in bound:
                raise DSNetError(f"{where}: {dotted}={value!r} is out of range; expected {bound}")


def model_min_input(name: str) -> int:
    """Smallest square input side the model ``name`` takes: the zoo's pyramids need 32 px (four downsamplings
    4, 2, 2, 2 must leave one pixel), other timm models their pretrained config's ``min_input_size`` (else 1)."""
    if name in list_zoo():
        return MIN_INPUT_SIZE
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        return 1
    min_size = getattr(cfg, "min_input_size", None) if cfg is not None else None
    return int(min(min_size[1:])) if min_size else 1


#: The ranges of the keys every task shares (the ``train`` section and the schedule's length).
LOOP_RANGES: dict[str, Bound] = {
    k: v
    for k, v in RUN_RANGES.items()
    if k.startswith("train.") or k in ("sched.epochs", "sched.updates", "sched.minutes")
}


def check_loop_rules(cfg: Any, where: str) -> None:
    """The rules between the loop's keys, for any task's config (sections ``train`` and ``sched``)."""
    t, s = cfg.train, cfg.sched
    if t.batch_size % t.accum_steps:
        raise DSNetError(
            f"{where}: train.accum_steps={t.accum_steps} must divide train.batch_size={t.batch_size} "
            "(the global batch is split into equal micro-batches)"
        )
    if s.minutes is not None and s.updates is not None:
        raise DSNetError(
            f"{where}: sched.minutes={s.minutes} and sched.updates={s.updates} both set the schedule's length; keep one"
        )


def _check_run(cfg: RunConfig, where: str) -> None:
    """Range checks of :data:`RUN_RANGES`, then the rules between fields."""
    check_ranges(cfg, RUN_RANGES, where)
    check_loop_rules(cfg, where)
    d = cfg.data
    for key in ("scale", "ratio"):
        low, high = getattr(d, key)
        if low > high:
            raise DSNetError(f"{where}: data.{key}={[low, high]} must be [low, high] with low <= high")
    if cfg.model.in_chans not in (1, 3):
        raise DSNetError(
            f"{where}: model.in_chans={cfg.model.in_chans}: images are read as grey (1 channel) or RGB (3), "
            "so the model must take 1 or 3 channels"
        )
    if d.mean is not None and d.std is not None and len(d.mean) != len(d.std):
        raise DSNetError(f"{where}: data.mean has {len(d.mean)} values but data.std has {len(d.std)}")
    min_input = model_min_input(cfg.model.name)
    if d.input_size < min_input:
        raise DSNetError(
            f"{where}: data.input_size={d.input_size} is too small for {cfg.model.name}; "
            f"it takes inputs of at least {min_input}x{min_input} px"
        )


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _section_fields(section: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(section)}


def valid_keys(cfg: Any) -> list[str]:
    """Every ``section.key`` of a sectioned config dataclass instance (for error messages and docs)."""
    return [f"{s}.{k}" for s in _section_fields(cfg) for k in _section_fields(getattr(cfg, s))]


def _unknown(key: str, where: str, cfg: Any, aliases: typing.Iterable[str] = ()) -> DSNetError:
    valid = valid_keys(cfg)
    close = difflib.get_close_matches(key, valid + sorted(aliases), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return DSNetError(f"unknown config key {key!r} in {where}.{hint} Valid keys: {', '.join(valid)}")


def coerce_value(value: Any, annotation: Any, key: str) -> Any:
    """Check / convert a YAML value to the field's annotated type; raise DSNetError naming the key.

    Shared by every typed config of the project (classification runs, detection runs).
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(value, arg, key)
            except ValueError as err:
                errors.append(str(err))
        raise DSNetError(errors[0] if errors else f"config key {key!r}: bad value {value!r}")
    if isinstance(value, str) and value.lower() in ("none", "null") and annotation is not str:
        raise DSNetError(f"config key {key!r} cannot be None")
    if annotation is Any:
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise DSNetError(f"config key {key!r} expects a list, got {value!r}")
        item = args[0] if args else Any
        if (len(args) == 2 and args[1] is Ellipsis) or len(args) == 1:
            return tuple(coerce_value(v, item, key) for v in value)
        if len(value) != len(args):
            raise DSNetError(f"config key {key!r} expects {len(args)} values, got {value!r}")
        return tuple(coerce_value(v, a, key) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise DSNetError(f"config key {key!r} expects a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise DSNetError(f"config key {key!r} expects true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise DSNetError(f"config key {key!r} expects an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-3" as a string
            except ValueError:
                pass
        raise DSNetError(f"config key {key!r} expects a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise DSNetError(f"config key {key!r} expects a string, got {value!r}")
    return value


def set_value(cfg: Any, dotted: str, value: Any, where: str, aliases: typing.Iterable[str] = ()) -> None:
    """Set ``section.key`` (or ``section.mapping_field.item``) of the config dataclass ``cfg``, type-checked.

    ``where`` names the origin (a file, ``--set``) in the error raised for an unknown key or a badly typed value.
    """
    parts = dotted.split(".")
    if len(parts) not in (2, 3) or parts[0] not in _section_fields(cfg):
        raise _unknown(dotted, where, cfg, aliases)
    section = getattr(cfg, parts[0])
    if parts[1] not in _section_fields(section):
        raise _unknown(dotted, where, cfg, aliases)
    annotation = typing.get_type_hints(type(section))[parts[1]]
    if len(parts) == 3:  # one item of a mapping field, e.g. model.kwargs.img_size=64
        if typing.get_origin(annotation) is not dict:
            raise _unknown(dotted, where, cfg, aliases)
        getattr(section, parts[1])[parts[2]] = value
        return
    setattr(section, parts[1], coerce_value(value, annotation, dotted))


ConfigT = typing.TypeVar("ConfigT")


def load_typed_config(
    config_class: type[ConfigT],
    path: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    *,
    rename: typing.Callable[[str, Any], tuple[str, Any]] | None = None,
    aliases: typing.Iterable[str] = (),
    legacy_sections: typing.Iterable[str] = (),
    check: typing.Callable[[ConfigT, str], None] | None = None,
) -> ConfigT:
    """A sectioned config dataclass from its defaults, then the YAML recipe at ``path``, then ``key=value`` overrides.

    ``config_class`` holds one dataclass per section (``RunConfig``, ``DetectionConfig``...). A recipe is a mapping
    of sections (or, with ``rename``, of flat keys that ``rename`` maps to ``section.key``); it may hold
    ``base: other.yaml`` (relative to itself) to start from another recipe. Overrides are ``section.key=value``
    with YAML values. ``aliases`` are extra accepted names offered in "did you mean" hints. ``legacy_sections`` are
    sections of earlier versions that a recipe may still hold: their keys are read as ``section.key`` and left to
    ``rename``. ``check(cfg, where)`` validates the result (ranges, rules between fields) and raises DSNetError.

    Raises:
        FileNotFoundError: the recipe does not exist.
        DSNetError: an unknown key (the message lists the valid ones), a badly typed value, a value out of range,
            a YAML syntax error (file, line, column) or a malformed override.
    """
    cfg = config_class()
    sections = set(_section_fields(cfg)) | set(legacy_sections)

    def assign(key: str, value: Any, where: str) -> None:
        if rename is not None:
            key, value = rename(key, value)
        set_value(cfg, key, value, where, aliases)

    if path is not None:
        for key, value in _read_recipe(Path(path), sections):
            assign(key, value, str(path))
    for item in overrides:
        if "=" not in item:
            raise DSNetError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.002)")
        key, raw = item.split("=", 1)
        assign(key.strip(), read_yaml(raw, f"--set {key.strip()}") if raw.strip() else None, "--set")
    if check is not None:
        where = "config" + (f" {path}" if path is not None else "") + (" with --set" if overrides else "")
        check(cfg, where)
    return cfg


def read_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)``; a syntax error becomes a one-line DSNetError: ``where:line:column: problem``, plus
    where the construct that failed began (the unclosed ``[``, say)."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        message = f"{where}{at}: YAML syntax error: {err.problem or err.context or 'invalid YAML'}"
        if err.context and err.context_mark is not None and err.problem:
            cm = err.context_mark
            message += f" ({err.context} started at line {cm.line + 1}, column {cm.column + 1})"
        raise DSNetError(message) from None
    except yaml.YAMLError as err:
        raise DSNetError(f"{where}: YAML error: {err}") from None


def _flat_recipe_key(key: str, value: Any) -> tuple[str, Any]:
    key = FLAT_KEYS.get(key, key)
    if key == "train.ema" and isinstance(value, bool):  # flat recipes say `ema: true|false`
        value = DEFAULT_EMA_DECAY if value else 0.0
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A :class:`RunConfig` from defaults, then the YAML recipe at ``path``, then ``key=value`` overrides.

    Nested and flat (:data:`FLAT_KEYS`) recipe keys are both accepted; see :func:`load_typed_config`.
    """
    return load_typed_config(RunConfig, path, overrides, rename=_flat_recipe_key, aliases=FLAT_KEYS, check=_check_run)


def _flatten(tree: dict[str, Any], sections: set[str], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and not prefix and key in sections:
            items.extend(_flatten(value, sections, f"{dotted}."))
        else:
            items.append((dotted, value))
    return items


def _read_recipe(path: Path, sections: set[str], seen: tuple[Path, ...] = ()) -> list[tuple[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise DSNetError(f"config {path}: circular 'base' chain")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DSNetError(f"config {path}: cannot read it ({err})") from None
    tree = read_yaml(text, str(path)) or {}
    if not isinstance(tree, dict):
        raise DSNetError(f"config {path}: expected a mapping at the top level, got {type(tree).__name__}")
    items: list[tuple[str, Any]] = []
    base = tree.pop("base", None)
    if base is not None:
        items.extend(_read_recipe(path.parent / base, sections, (*seen, path.resolve())))
    return items + _flatten(tree, sections)
