"""Backend-independent generation: sequence state, sampling, stop strings, the decode loop."""
