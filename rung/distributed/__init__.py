"""Tensor parallelism over torch.distributed: which slice each rank holds (shard.py), the model's
collectives attached from outside (collectives.py), and the worker processes that run each engine
step on their shards (workers.py)."""
