"""Training objectives: one module each, one interface (`trainer.objectives.base.Objective`)."""
