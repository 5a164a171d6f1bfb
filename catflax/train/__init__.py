"""Training: state, the two jitted steps, the stage loop, checkpoints and metrics."""
