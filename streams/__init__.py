"""tagstream: WeCom custom tags -> Tencent Ads conversion reports, as a Kafka stream processor.

Where to start reading:
- `streams.topology`  the whole flow on one screen: topics, tables, agents;
- `streams.semantics` the reporting rules of SPEC §4, as plain Python (no Faust, no Kafka);
- `streams.rulebook`  versioned reporting rules, looked up as of event time;
- `streams.settings`  every setting, its default and its TAGSTREAM_* variable.
"""
