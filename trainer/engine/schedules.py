"""Re-export of `trainer.schedules` (the schedules live in a leaf module both the engine and objectives use)."""

from trainer.schedules import CosineSchedule, cosine_from_epochs

__all__ = ["CosineSchedule", "cosine_from_epochs"]
