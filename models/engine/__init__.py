"""Training engine: trainer (single process / torchrun DDP), checkpoints, evaluation, the demo."""
