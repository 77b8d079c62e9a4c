"""Image and clip data: sources by name, seeded stratified splits, statistics, keyed augmentation, batches.

- `source`: the `DataSource` protocol (len, labels, channels, image size, `read(i)`; `num_frames` for
  clips, read with `frames_of`), `ImageData` (a data set in memory: images [N, C, H, W] or clips
  [N, C, T, H, W]) and `Source` (a base for sources that read one sample at a time);
- `load`: the `DATASETS` registry, `register_dataset`, the `NAME` / `NAME:ARG` spec, `load_dataset`;
- `sources/`: the built-in sources, one module each (digits, npz, torchvision, imagefolder, and
  movingdigits: the embedded clips);
- `splits`: disjoint `train` (MAE pretraining and the labeled train set), `val` (the learned
  masker's validation) and `test` (evaluation only);
- `stats`: per-channel statistics and normalisation;
- `fingerprint`: what a data set was (`data_fingerprint`) and what changed since (`fingerprint_change`);
- `augment`: MAE's crop + flip as pure functions, keyed per sample;
- `loader`: `BatchStream` (a seeded endless sampler whose position is a state dict), `Batcher`
  (indices -> tensors) and `Loader` (both, sharded, with an optional prefetch).
"""

from maskkit.data.augment import (
    AUGMENT_MIN_SIDE,
    CLIP_AUGMENT_MIN_SIDE,
    crop_box,
    crop_flip,
    key_seed,
    random_resized_crop_flip,
    resolve_augment,
)
from maskkit.data.fingerprint import data_fingerprint, fingerprint_change
from maskkit.data.folder_index import INDEX_FILE, FolderIndex
from maskkit.data.load import (
    DATASETS,
    DatasetSpec,
    dataset_arg,
    load_dataset,
    parse_dataset,
    parse_spec,
    recorded_spec,
    register_dataset,
    source_options,
    split_options,
)
from maskkit.data.loader import (
    Batch,
    Batcher,
    BatchStream,
    DataWarning,
    Fetched,
    Loader,
    default_workers,
    shard,
)
from maskkit.data.source import (
    MIN_CLASSES,
    DataChangedError,
    DataError,
    DataSource,
    ImageData,
    Source,
    check_classes,
    check_dir,
    frames_of,
    resize,
    sample_dims,
)
from maskkit.data.sources.imagefolder import (
    IMAGE_SUFFIXES,
    SPLIT_FOLDERS,
    ImageFolder,
    imagefolder_layout,
    load_imagefolder,
)
from maskkit.data.sources.movingdigits import moving_digits
from maskkit.data.sources.npz import NpzData, load_npz
from maskkit.data.splits import DEFAULT_FRACTIONS, make_splits, stratified_split
from maskkit.data.stats import channel_stats, denormalize, normalize

__all__ = [
    "AUGMENT_MIN_SIDE",
    "CLIP_AUGMENT_MIN_SIDE",
    "DATASETS",
    "DEFAULT_FRACTIONS",
    "IMAGE_SUFFIXES",
    "INDEX_FILE",
    "MIN_CLASSES",
    "NpzData",
    "SPLIT_FOLDERS",
    "Batch",
    "BatchStream",
    "Batcher",
    "DataChangedError",
    "DataError",
    "DataSource",
    "DataWarning",
    "Fetched",
    "FolderIndex",
    "ImageFolder",
    "DatasetSpec",
    "ImageData",
    "Loader",
    "Source",
    "channel_stats",
    "check_classes",
    "check_dir",
    "crop_box",
    "crop_flip",
    "data_fingerprint",
    "dataset_arg",
    "default_workers",
    "denormalize",
    "fingerprint_change",
    "frames_of",
    "imagefolder_layout",
    "key_seed",
    "load_dataset",
    "load_imagefolder",
    "load_npz",
    "make_splits",
    "moving_digits",
    "normalize",
    "parse_dataset",
    "parse_spec",
    "recorded_spec",
    "random_resized_crop_flip",
    "register_dataset",
    "resize",
    "resolve_augment",
    "sample_dims",
    "shard",
    "source_options",
    "split_options",
    "stratified_split",
]
