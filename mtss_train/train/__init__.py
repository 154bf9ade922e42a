"""Training: configuration, the trainer, its state and steps, inputs, reporting, distribution."""
