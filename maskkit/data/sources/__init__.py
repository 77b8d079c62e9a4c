"""The built-in data sources, one module each; importing this package registers them in `DATASETS`.

A new built-in source is one more module here (and one line below); a third-party source is the same
module in its own package, named in MASKKIT_PLUGINS or an entry point (group `maskkit.datasets`).
"""

from maskkit.data.sources import (  # noqa: F401  (they register)
    clipfolder,
    digits,
    imagefolder,
    mnist5k,
    movingdigits,
    npz,
    photos8,
    torchvision_sets,
)
