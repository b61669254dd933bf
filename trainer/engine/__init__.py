"""The training engine: one loop for every objective (see docs/training.md).

config (recipes) · optim (AdamW groups) · checkpoint · seeding (per-sample generators) ·
feed (loaders; prepare in workers) · ema (teachers) · interrupt (signals) · memory (estimate) ·
loop (`Trainer`) · distributed (torchrun, explicit gradient sync) · run_log (console, CSV, TensorBoard).
Schedules live in the leaf module `trainer.schedules`.
"""
