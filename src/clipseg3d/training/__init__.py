"""Training: the Lightning task, fine-tuning, losses and callbacks."""
