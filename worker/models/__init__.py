"""One module per architecture: the tensor map and the layer recipe (NumPy reference)."""
