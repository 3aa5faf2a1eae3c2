"""Replaying history (SPEC §6): the reports a live run would have produced, from a time range
of the input topics or from NDJSON archives.

- `engine`: the replay itself, over the pure core (no Kafka);
- `archive`: reading and writing NDJSON archives;
- `run`: `tagstream replay` and `tagstream archive`: sources, outputs, comparison with what
  was delivered.
"""
