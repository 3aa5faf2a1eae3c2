"""The pure core: SPEC §4's reporting semantics, the versioned rule book, and the event-time
merge of the two event topics. Plain Python, no Faust and no Kafka; the agents, replay and
the reference-model tests all run the same code.

- `semantics`: `ReportingEngine.on_event / on_idle / flush` over a small `StateStore`;
- `rulebook`: rules looked up as of an event's `ts`;
- `merge`: which buffered event may be applied next.
"""
