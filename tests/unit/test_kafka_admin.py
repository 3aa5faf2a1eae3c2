"""Reading a DescribeTopics answer (streams.kafka.admin.partition_counts)."""
from streams.kafka.admin import partition_counts


def _topic(name: str, partitions: int, error_code: int = 0) -> dict:
    return {"error_code": error_code, "topic": name, "is_internal": False,
            "partitions": [{"error_code": 0, "partition": p, "leader": 1, "replicas": [1], "isr": [1]}
                           for p in range(partitions)]}


def test_counts_partitions_once_every_topic_is_known():
    assert partition_counts([_topic("a.tag-events", 4), _topic("a.contact-events", 2)]) == {
        "a.tag-events": 4, "a.contact-events": 2}


def test_a_topic_with_no_partitions_yet_is_not_an_answer():
    # What a fresh broker gave right after CreateTopics (CI, 2 Dec): a topic it had just
    # created, described with no partitions. Read as a count, it looked like 0 partitions.
    assert partition_counts([_topic("a.tag-events", 4), _topic("a.contact-events", 0)]) is None


def test_a_topic_the_broker_does_not_know_yet_is_not_an_answer():
    unknown = {**_topic("a.contact-events", 0), "error_code": 3}  # UNKNOWN_TOPIC_OR_PARTITION
    assert partition_counts([_topic("a.tag-events", 4), unknown]) is None
