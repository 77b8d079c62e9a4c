"""Built-in masking policies; importing this package registers them."""

from maskkit.policies.base import MaskPolicy
from maskkit.policies.random import RandomPolicy

__all__ = ["MaskPolicy", "RandomPolicy"]
