"""Pure-PyTorch implementations written from SPEC.md: the float64 test oracles and the "eager" benchmark baselines."""
