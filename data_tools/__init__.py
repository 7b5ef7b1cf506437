"""Shard building and inspection tools (`vdep build-shards`, `vdep make-tokenizer`)."""
