"""Public functions, one module per op: each calls `torch.ops.ltkernels.<op>` and registers its fake and autograd."""
