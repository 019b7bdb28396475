"""Pipeline stages: each reads and returns the pipeline State (see ptq.pipeline)."""
