"""Pure-PyTorch implementations written from docs/spec.md: the float64 test oracles and the "eager" benchmark baselines."""
