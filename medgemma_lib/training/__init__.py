"""Lesson 05: the training recipe (`train.run_training`), its trainer parts, the stop token, the training log,
checkpoints and the run folder."""
