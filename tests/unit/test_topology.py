"""The topology wires what the SPEC names, and orjson (not a Faust codec) does the encoding."""
from streams.settings import Settings
from streams.topology import build_topology


def test_every_topic_and_table_moves_raw_bytes(tmp_path):
    topology = build_topology(Settings.load(overrides={"data_dir": str(tmp_path)}, environ={}))
    for table in topology.app.tables.values():      # Faust tables (rule_versions)
        assert (table.key_serializer, table.value_serializer) == ("raw", "raw")
    for topic in topology.app.topics:
        assert topic.key_serializer in ("raw", None) and topic.value_serializer in ("raw", None)
    assert topology.app.conf.key_serializer == "raw" and topology.app.conf.value_serializer == "raw"


def test_describe_names_the_whole_flow(tmp_path):
    text = build_topology(Settings.load(overrides={"data_dir": str(tmp_path)}, environ={})).describe()
    for name in ("tagstream.tag-events", "tagstream.contact-events", "tagstream.tag-mappings",
                 "tagstream.conversion-reports", "tagstream.unreportable", "tagstream.dead-letters",
                 "rule_versions", "reporting_state", "RuleReplica"):
        assert name in text


def test_a_worker_at_log_level_warning_builds_no_debug_records(tmp_path):
    # Faust's terminal spinner sets the root logger to DEBUG at level warning or above, so
    # every debug call in aiokafka (one per produced record) built a LogRecord.
    import logging

    from streams.topology import DrainingWorker

    topology = build_topology(Settings.load(overrides={"data_dir": str(tmp_path)}, environ={}))
    worker = DrainingWorker(topology.app, topology.before_stop, loglevel="warning", quiet=True)
    root_level = logging.root.level
    try:
        worker._setup_logging()
        assert not logging.getLogger("aiokafka.producer.producer").isEnabledFor(logging.DEBUG)
        assert logging.getLogger("aiokafka").isEnabledFor(logging.WARNING)
    finally:
        logging.root.setLevel(root_level)
