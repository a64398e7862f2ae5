"""Compose and Conquer's model: local fuser (depth), global fuser (exemplars), soft guidance,
conditioning, the pipeline, the training loss and the official-checkpoint converter."""
