"""Kafka plumbing: the Faust consumer that hands the agent whole batches, topic creation,
and producing records to the input topics.

- `faust_consumer`: `BatchingConsumer`, the hot path's way around Faust's per-record machinery;
- `admin`: the topics, created with the layout tagstream needs;
- `producer`: generated or archived records to the input topics, in batches.
"""
