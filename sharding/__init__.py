"""Shard planning, manifests, the shard store and resume state."""
