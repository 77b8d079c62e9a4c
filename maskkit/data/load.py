"""Data sets by name: the `DATASETS` registry, the `NAME` / `NAME:ARG` spec grammar, and `load_dataset`.

A data source is registered as a factory (a class, or a function returning a `DataSource`) that is
called with keywords only:

    factory(arg=ARG or None, data_dir=Path | None, download=bool, img_size=int | None) -> DataSource

- a spec may carry source options between the name and the colon, `NAME,KEY=VALUE,...[:ARG]` (e.g.
  `imagefolder,hash=content:/data/imagenet`): each reaches the factory as the keyword KEY with the
  text VALUE, and must be a keyword the factory names (not one of the keywords below); the spec,
  options included, is what a run records and replays on `--resume`, `evaluate` and `visualize`;
- `arg` is the text after `NAME:`; the factory declares what it is with `dataset_arg` (set by
  `register_dataset(..., arg=...)` or as a class attribute): None (default: the spec is the bare
  NAME), "path" (a file or folder; a run records it as an absolute path) or "value" (any text, kept
  as given);
- `data_dir` / `download` are `--data-dir` / `--download`;
- `img_size` is a hint: a source may read its images at that size (the image folder does, so that
  folders of mixed sizes load); `load_dataset` resizes whatever still comes back at another size.

A factory may take `**kwargs` for the keywords it does not use; its card lists the ones it names. A source
may define `fingerprint()`: a JSON object with a "kind" that changes when its data does (a run records it
in config.json, and `evaluate`, `visualize` and `--resume` check it; `maskkit.data.fingerprint`); one
without gets a digest of its arrays (in memory) or its count, size and labels.
A new source is one file: a class or function decorated with `register_dataset` (in maskkit, a
module under `maskkit/data/sources/`; elsewhere, a module named in MASKKIT_PLUGINS or an entry
point in the group `maskkit.datasets`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from maskkit.data.checks import checked
from maskkit.data.source import DataError, DataSource, ImageData, Resized, resize
from maskkit.registry import Card, Registry

DATASETS: Registry[DataSource] = Registry("dataset", "maskkit.datasets", builtins="maskkit.data.sources")

#: what the ARG of `NAME:ARG` is, by a source's `dataset_arg`
ARG_KINDS = (None, "path", "value")


def register_dataset(
    name: Any = None, *, card: Card | None = None, arg: str | None = None, overwrite: bool = False
) -> Any:
    """Register a data source factory under `name`: `@register_dataset("mine", card=Card(...), arg="value")`.

    `arg` (None | "path" | "value") says what the spec's ARG is; None keeps the factory's own
    `dataset_arg` (default: no ARG). See the module docstring for the factory's call.
    """
    if arg not in ARG_KINDS:
        raise ValueError(f"arg must be one of None, 'path', 'value', got {arg!r}")

    def decorator(fn: Callable[..., DataSource], key: str | None = None) -> Callable[..., DataSource]:
        if arg is not None:
            fn.dataset_arg = arg  # type: ignore[attr-defined]
        return DATASETS.register(key, card=card, overwrite=overwrite)(fn)

    if callable(name):  # bare decorator
        return decorator(name)
    return lambda fn: decorator(fn, name)


def dataset_arg(name: str) -> str | None:
    """What the registered source `name` takes after `NAME:` (None, "path" or "value")."""
    kind = getattr(DATASETS.get(name), "dataset_arg", None)
    if kind not in ARG_KINDS:
        raise ValueError(f"dataset {name!r} declares dataset_arg {kind!r}; use None, 'path' or 'value'")
    return kind


def usage() -> str:
    """Every registered spec form: 'cifar10, ..., digits, ..., imagefolder:PATH, npz:PATH, mine:ARG'."""
    bare = [n for n in DATASETS.names() if dataset_arg(n) is None]
    with_arg = [f"{n}:{'PATH' if dataset_arg(n) == 'path' else 'ARG'}" for n in DATASETS.names() if dataset_arg(n)]
    return ", ".join(bare + with_arg)


#: the keywords every factory is called with: not source options
CALL_KEYWORDS = ("arg", "data_dir", "download", "img_size", "cache_dir", "check", "num_frames", "sampling_rate")


def split_options(spec: str) -> tuple[str, dict[str, str]]:
    """'imagefolder,hash=content:/d' -> ('imagefolder:/d', {'hash': 'content'}); DataError for an option that
    is not KEY=VALUE or is given twice. The options end at the first ':' (the ARG may hold commas)."""
    head, sep, rest = spec.partition(":")
    name, *pairs = head.split(",")
    options: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not (eq and key and value):
            raise DataError(f"dataset {spec!r}: option {pair!r} is not KEY=VALUE (NAME,KEY=VALUE[:ARG])")
        if key in options:
            raise DataError(f"dataset {spec!r} gives option {key!r} twice")
        options[key] = value
    return name + sep + rest, options


def source_options(name: str) -> list[str]:
    """The options the registered source `name` takes in its spec: its factory's keywords but CALL_KEYWORDS."""
    import inspect

    try:
        params = inspect.signature(DATASETS.get(name)).parameters.values()
    except (TypeError, ValueError):
        return []
    named = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in named and p.name not in CALL_KEYWORDS]


def recorded_spec(spec: str) -> str:
    """`spec` as a run records it: a path ARG made absolute (usable from any directory), options kept."""
    options = split_options(spec)[1]
    name, path = parse_dataset(spec)
    if path is None:
        return spec
    return ",".join([name] + [f"{k}={v}" for k, v in options.items()]) + f":{Path(path).resolve()}"


class DatasetSpec(NamedTuple):
    """A parsed `NAME` / `NAME:ARG`: the registered name and the ARG (None for a bare NAME)."""

    name: str
    arg: str | None


def parse_spec(spec: str) -> DatasetSpec:
    """'digits' -> ('digits', None); 'npz:PATH' -> ('npz', 'PATH'); 'imagefolder,hash=content:PATH' ->
    ('imagefolder', 'PATH') (`split_options` gives the options); a DataError for unknown names, a missing /
    unexpected ARG, or an option the source does not take."""
    base, options = split_options(spec)
    name, sep, rest = base.partition(":")
    kind = dataset_arg(name) if name in DATASETS else "unknown"
    if kind == "unknown" or bool(sep) != (kind is not None):
        raise DataError(f"unknown dataset {spec!r}; use one of {usage()}")
    if sep and not rest:
        raise DataError(f"dataset {spec!r} needs {'a path' if kind == 'path' else 'an argument'} after '{name}:'")
    accepted = source_options(name)
    for key in options:
        if key not in accepted:
            takes = f"its options: {', '.join(accepted)}" if accepted else "it takes none"
            raise DataError(f"dataset {spec!r}: {name!r} takes no option {key!r} ({takes})")
    return DatasetSpec(name, rest or None)


def parse_dataset(spec: str) -> tuple[str, str | None]:
    """(name, path): 'digits' -> ('digits', None); 'npz:PATH' -> ('npz', 'PATH'); else DataError.

    The second element is the path to record absolute, so it is None also for a source whose ARG is
    not a path (`dataset_arg` "value"); `parse_spec` gives the ARG itself.
    """
    name, arg = parse_spec(spec)
    return name, arg if dataset_arg(name) == "path" else None


def load_dataset(
    name: str, data_dir: str | Path | None = None, *, download: bool = False, img_size: int | None = None,
    cache_dir: str | Path | None = None, check: bool = True, num_frames: int | None = None,
    sampling_rate: int | None = None,
) -> DataSource:
    """The data source `name` (`NAME[,KEY=VALUE...][:ARG]`, see `DATASETS`), at img_size x img_size if given.

    The in-memory sources come back as `ImageData` (torchvision sets: train and test files together);
    `img_size` resizes every image (bilinear); None keeps the size. `cache_dir` (a run directory) and
    `check` reach a factory that takes them (the image folder: its saved index, and whether to check it
    against the folder). `num_frames` and `sampling_rate` (--num-frames, --sampling-rate: frames per clip and the
    stride between them) reach a video source that takes them; given to a source that does not, a DataError
    naming the option. Every source's labels and sizes are checked, and a plugin source's samples as they are
    read (`maskkit.data.checks`); an exception raised inside a plugin source is one line naming it.
    """
    spec, options = parse_spec(name), split_options(name)[1]
    factory = DATASETS.get(spec.name)
    extra = {k: v for k, v in (("cache_dir", cache_dir), ("check", check)) if _takes(factory, k)}
    for key, value in (("num_frames", num_frames), ("sampling_rate", sampling_rate)):
        if value is not None:
            if not _takes(factory, key):
                raise DataError(f"--{key.replace('_', '-')} applies to video sources only; dataset {spec.name!r} "
                                "does not take it")  # fmt: skip
            extra[key] = value
    try:
        data = factory(arg=spec.arg, data_dir=data_dir, download=download, img_size=img_size, **options, **extra)
        if len(data) == 0:
            raise DataError(f"dataset {name!r} holds no images")
        data = checked(data, factory, name, DATASETS.label(factory))  # labels and sizes; a plugin's samples as they are read
    except DataError:
        raise
    except Exception as err:
        raise DATASETS.plugin_error(factory, "loading", err)  # noqa: B904 (chained by plugin_error)
    if img_size is not None and data.image_size != (img_size, img_size):
        if isinstance(data, ImageData):
            data = replace(data, images=resize(data.floats(slice(None)), img_size))
        else:
            data = Resized(data, img_size)
    return data


def _takes(factory: Callable[..., Any], keyword: str) -> bool:
    """Whether `factory` names `keyword` among its parameters (not merely through **kwargs)."""
    import inspect

    try:
        return keyword in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
