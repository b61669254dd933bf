"""The training engine: one loop for every objective (see docs/training.md).

config (recipes) · schedules · optim (AdamW groups) · checkpoint · feed (per-epoch
loaders) · loop (`Trainer`) · distributed (torchrun/DDP) · run_log (console, CSV, TensorBoard).
"""
