"""Wire formats of tagstream (SPEC §3): record types, JSON Schemas and fast validation.

Everything that crosses a topic boundary is defined here once. Nothing in this package
imports Faust or Kafka, so the semantics core, the agents, the sink and the tests all share
the same definitions.
"""
