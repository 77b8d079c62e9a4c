"""Adapters: the only code in maskkit that knows a foreign MAE codebase."""
