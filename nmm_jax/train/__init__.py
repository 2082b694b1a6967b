"""Training: optimizer and schedules, train state, pure step functions, loss, metrics, the loop."""
