"""GGUF files: memory-mapped reading with validation, hyperparameters, NumPy
dequantization."""
