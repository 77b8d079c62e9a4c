"""What a data source gives is checked where it enters: its labels once, at load; a plugin's samples as they are read.

- `check_source(data, spec)` (`load_dataset` calls it on every source): channels and image size are positive
  integers, and `num_frames` is None (images) or a positive integer (clips); labels, when there are any, are an
  int64 tensor [N] with one label per image, in [0, num_classes) (a shorter list would drop images from the
  splits, an out-of-range label fail evaluation); a data set held in memory (`ImageData`) has [N, C, H, W]
  (clips: [N, C, T, H, W]) uint8 or finite float32 images, checked once here.
- `Checked(source, factory)`: the view `load_dataset` returns for a plugin's source that reads samples itself.
  Each sample it reads (`read`, `floats`, and `pixels` where the source has it) is checked: [C, H, W] with the
  source's `in_chans` and `image_size` (a source of clips: [C, T, H, W], T its `num_frames`), float32 (`pixels`:
  uint8 or float32), finite. An exception raised by the plugin's code becomes one line naming it. maskkit's own
  sources are not wrapped (their reads are its code).

Every failure is a `SourceError`: a `DataError` (so the loader's workers report it in one line, and
--skip-bad-images skips a bad sample) and a `PluginError`, with the plugin's exception chained as its cause.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from maskkit.data.source import DataError, DataSource, ImageData, Index, Source, as_positions, frames_of
from maskkit.registry import PluginError, is_builtin, plugin_error


class SourceError(DataError, PluginError):
    """A data source's output that failed a check, or an exception raised inside a plugin source."""


def finite(x: Tensor) -> bool:
    """Whether every value of float tensor `x` is finite: its sum is (NaN and inf propagate; one reduction, many
    times cheaper on the CPU than `isfinite(x).all()`; accumulated in float64, so a sum of finite samples does
    not overflow)."""
    return math.isfinite(float(x.sum(dtype=torch.float64)))


def check_source(data: DataSource, spec: str) -> None:
    """SourceError naming dataset `spec` and the check, unless `data`'s sizes, labels (and in-memory images) are
    usable; see the module docstring. Cost: one pass over the labels (and over an in-memory float array)."""
    who = f"dataset {spec!r}"
    chans, size = data.in_chans, data.image_size
    if isinstance(chans, bool) or not isinstance(chans, int) or chans < 1:
        raise SourceError(f"{who}: in_chans must be a positive integer, got {chans!r}")
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)):  # fmt: skip
        raise SourceError(f"{who}: image_size must be two positive integers (H, W), got {size!r}")
    frames = frames_of(data)
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise SourceError(f"{who}: num_frames must be None (images) or a positive integer (clips), got {frames!r}")
    check_labels(data, who)
    if isinstance(data, ImageData):
        images = data.images
        if images.dim() not in (4, 5) or images.dtype not in (torch.uint8, torch.float32):
            raise SourceError(f"{who}: images must be [N, C, H, W] (clips [N, C, T, H, W]) uint8 or float32, got "
                              f"{tuple(images.shape)} {images.dtype}")  # fmt: skip
        if images.dtype == torch.float32 and not finite(images):
            first = int((~torch.isfinite(images)).flatten(1).any(1).nonzero()[0])
            raise SourceError(f"{who}: image {first} holds non-finite values (NaN or inf)")


def check_labels(data: DataSource, who: str) -> None:
    """SourceError unless `data.labels` is None or an int64 tensor [len(data)] with values in [0, num_classes)."""
    labels, n = data.labels, len(data)
    if labels is None:
        return
    if not isinstance(labels, Tensor):
        raise SourceError(f"{who}: labels must be a torch tensor [N] of int64 class indices, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise SourceError(f"{who}: labels must be int64 class indices, got {str(labels.dtype).removeprefix('torch.')}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise SourceError(f"{who}: labels must be one per image: {n} images but labels of shape {tuple(labels.shape)}")
    low, high, classes = int(labels.min()), int(labels.max()), data.num_classes
    if low < 0 or high >= classes:
        raise SourceError(f"{who}: label {low if low < 0 else high} is out of range: labels must be class indices "
                          f"in [0, {classes}) (num_classes {classes})")  # fmt: skip


class Checked(Source):
    """A plugin source whose every sample is checked as it is read (see the module docstring); other attributes
    (`fingerprint`, ...) are the source's own."""

    def __init__(self, source: DataSource, factory: Callable[..., Any], spec: str, label: str | None = None) -> None:
        self.source, self.factory = source, factory
        self.who = f"dataset {spec!r}"
        self.label = label or self.who  # the plug-in's registered name in messages (`DATASETS.label(factory)`)
        self.name, self.labels, self.classes = source.name, source.labels, source.classes
        self.layout = getattr(source, "layout", None)
        self.num_frames = frames_of(source)
        frames = () if self.num_frames is None else (self.num_frames,)
        self.shape = (source.in_chans, *frames, *source.image_size)  # [C, H, W] or [C, T, H, W] every sample must have
        self.form = "[C, H, W]" if self.num_frames is None else "[C, T, H, W]"
        self._own_floats = type(source).floats is not Source.floats if isinstance(source, Source) else True

    def __getattr__(self, name: str) -> Any:  # only for attributes this view does not define
        if name == "source" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.source, name)

    def __len__(self) -> int:
        return len(self.source)

    @property
    def in_chans(self) -> int:
        return self.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.shape[-2], self.shape[-1])

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)`: a DataError of the plugin's own passes (an unreadable file); any other exception becomes
        one SourceError naming the plugin and `what` (with the sample's index, for one sample)."""
        try:
            return fn(*args)
        except DataError:
            raise
        except Exception as err:
            call = f"{what}({int(args[0])})" if what != "floats" else what
            raise SourceError(str(plugin_error(self.label, self.factory, call, err))) from err

    def check(self, x: Any, positions: list[int], dtypes: tuple[torch.dtype, ...] = (torch.float32,),
              one: bool | None = None) -> Tensor:  # fmt: skip
        """`x` if it is this source's samples at `positions` ([C, H, W] for one position, [B, C, H, W] for a batch;
        clips [C, T, H, W] and [B, C, T, H, W]) with an allowed dtype and finite values, else a one-line
        SourceError naming the sample and the check; `one` says whether `x` is one sample (a `read`), else it is
        told from its dimensions. Cost: Python comparisons and one sum (floats only) per call."""
        dims = len(self.shape)
        if one is None:
            one = len(positions) == 1 and isinstance(x, Tensor) and x.dim() == dims
        if not isinstance(x, Tensor) or (tuple(x.shape) if one else tuple(x.shape[1:])) != self.shape or (
            not one and (x.dim() != dims + 1 or x.shape[0] != len(positions))
        ) or x.dtype not in dtypes or (x.is_floating_point() and not finite(x)):
            self._refuse(x, positions, one, dtypes)
        return x

    def _refuse(self, x: Any, positions: list[int], one: bool, dtypes: tuple[torch.dtype, ...]) -> None:
        """The SourceError naming the first check `x` fails (`check`)."""
        where = f"sample {positions[0]}" if len(positions) == 1 else f"samples {positions[0]}..{positions[-1]}"
        if not isinstance(x, Tensor):
            raise SourceError(f"{self.who}: {where}: got a {type(x).__name__}, not a tensor {self.form}")
        shape = tuple(x.shape) if one else tuple(x.shape[1:])
        dims = len(self.shape)
        if (not one and (x.dim() != dims + 1 or x.shape[0] != len(positions))) or shape != self.shape:
            if len(shape) == dims and (one or x.shape[0] == len(positions)):
                if shape[1:] == self.shape[1:]:
                    raise SourceError(f"{self.who}: {where} has {shape[0]} channels, but the source's in_chans is "
                                      f"{self.shape[0]}")  # fmt: skip
                if dims == 4 and shape[0] == self.shape[0] and shape[2:] == self.shape[2:]:
                    raise SourceError(f"{self.who}: {where} has {shape[1]} frames, but the source's num_frames is "
                                      f"{self.shape[1]}")  # fmt: skip
            sizes = "in_chans, image_size" if dims == 3 else "in_chans, num_frames, image_size"
            raise SourceError(f"{self.who}: {where} has shape {tuple(x.shape)}, expected "
                              f"{'' if one else f'[{len(positions)}] + '}{self.form} = {self.shape} ({sizes})")
        if x.dtype not in dtypes:
            names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise SourceError(f"{self.who}: {where} is {str(x.dtype).removeprefix('torch.')}, not {names}")
        bad = 0 if one else int((~torch.isfinite(x)).flatten(1).any(1).nonzero()[0])
        raise SourceError(f"{self.who}: sample {positions[bad]} holds non-finite values (NaN or inf)")

    def read(self, i: int) -> Tensor:
        return self.check(self._call("read", self.source.read, i), [int(i)], one=True)

    def floats(self, index: Index) -> Tensor:
        """The source's own batched read, else its samples read one at a time (each one's shape and dtype checked
        before they are stacked), stacked; then checked as a batch (one sum for the finite values)."""
        positions = as_positions(index, len(self))
        if self._own_floats:
            return self.check(self._call("floats", self.source.floats, index), positions)
        samples = [self._call("read", self.source.read, i) for i in positions]
        for x, i in zip(samples, positions, strict=True):
            if not isinstance(x, Tensor) or tuple(x.shape) != self.shape or x.dtype != torch.float32:
                self._refuse(x, [i], True, (torch.float32,))
        return self.check(torch.stack(samples), positions)


class CheckedFiles(Checked):
    """A `Checked` plugin source that decodes files (`pixels(i, draws)`, uint8 or float32 samples)."""

    def pixels(self, i: int, draws: list[float] | None = None) -> Tensor:
        x = self._call("pixels", self.source.pixels, i, draws)
        return self.check(x, [int(i)], (torch.uint8, torch.float32), one=True)


def checked(data: DataSource, factory: Callable[..., Any], spec: str, label: str | None = None) -> DataSource:
    """`data` as `load_dataset` returns it: checked (`check_source`), and a plugin source that reads samples
    itself wrapped in a `Checked` view; maskkit's own sources and data held in memory as they are."""
    check_source(data, spec)
    if isinstance(data, ImageData) or is_builtin(data):
        return data
    view = CheckedFiles if callable(getattr(data, "pixels", None)) else Checked
    return view(data, factory, spec, label)
