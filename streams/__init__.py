"""tagstream: WeCom custom tags -> Tencent Ads conversion reports, as a Kafka stream processor.

The layout is the architecture, one subpackage per concern:

- `topology`       the whole flow on one screen: topics, tables, agents (the app);
- `settings`       every setting in one typed object, read by every part;
- `core/`          the pure semantics: reporting engine, rule book, event-time merge;
- `kafka/`         Kafka plumbing: the batching Faust consumer, topics, producing input;
- `state/`         the worker's changelogged RocksDB state and its crash tests' failpoints;
- `sinks/`         delivering reports: the reporting sink and the Marketing API client;
- `replay/`        replaying history from the topics or from archives;
- `observability/` metrics, consumer lag, reading a running worker;
- `sources/`       generated load for the demo, benchmarks and tests;
- `cli/`           the `tagstream` command and the demo.

The Faust agents are in the top-level `agents/` package, the record types and JSON Schemas in
`schemas/`. WeCom's callback ingest (SPEC §7) will be `wecom/`, a subpackage like these.
"""
