"""Training the three CnC stages on Ray Train: config, data, loop, checkpoints, export."""
