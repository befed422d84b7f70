"""Checkpoint conversion that needs the trainer: resharding into another layout (it starts
trainers of that layout to write the new checkpoint), and the commands of
tools/convert_checkpoint.py. The formats themselves, and reading them, are l3train.checkpoint's."""
