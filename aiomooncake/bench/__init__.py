"""``python -m aiomooncake.bench``: pingpong, stream, bidir and EPLB benchmarks of aiomooncake side by
side with the raw Transfer Engine, torch.distributed backends and a local copy. See docs/benchmarks.md."""
