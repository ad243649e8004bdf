"""Shards: schema, writer, demo tasks, reader (see docs/data.md)."""
