"""The checkpoint store: the format of a checkpoint folder and its bytes in and out of storage.

Names (layout), the shard records and the manifest (manifest), the fsspec glue with hashed
writes and verified reads (storage), a state's skeleton and tensors (tree), the commit rule
over storage (commit) and torch.distributed.checkpoint under that rule (sharded). It knows
nothing of the TrainJob status, the training session or local mode: those build on it.
"""
