"""Compute backends: `numpy_ref` (the reference, `--device cpu`) and `cuda` (the product)."""
