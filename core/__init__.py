"""shardvision's engine: config, distribution, the training loop, checkpoints and logging."""
