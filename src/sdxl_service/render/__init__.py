"""The render worker process: the host of the engine, the batcher and its policy,
and the plan of how many workers run on which GPU."""
