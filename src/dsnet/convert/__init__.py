"""Foreign checkpoints (PaddleClas .pdparams, reference PyTorch .pth) → our state dicts, executing no code."""
