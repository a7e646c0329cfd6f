"""dgamix offline pipeline: ingest -> embed -> cluster -> assign -> stats -> tokenize, the specialized sets through
the same stages (targets), then bases.

Each stage module owns one step. It exposes a pure per-shard function (what a distributed engine would map over
shards) and a small `run(params)` driver that walks the shards, skips finished work and writes atomically.
"""
