"""Ray Data pipelines for the privacy stage and the three gears (thin wiring over `engine/` and
`sharding/`), and ingest and SA-1B export on a cluster."""
