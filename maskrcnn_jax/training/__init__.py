"""Training: TrainState, SGD optimizer, data parallelism, checkpoints, the loop.

Entry point: `trainer.train_and_evaluate(config, workdir)` (used by train.py).
"""
