"""The compiled murmur2 partitioner against aiokafka's pure-Python one (the Java client's
function): the same partition for a million keys, so no record moves."""
import os
import random

from aiokafka.partitioner import DefaultPartitioner, murmur2

from murmurhash2 import murmurhash2

from streams.kafka.partitioner import KAFKA_SEED, kafka_partition, partitioner


def test_a_million_keys_land_where_aiokafkas_partitioner_puts_them():
    rng = random.Random(24)
    keys = [rng.randbytes(rng.randrange(0, 80)) for _ in range(500_000)]       # every length mod 4
    keys += [os.urandom(32).hex().encode() for _ in range(250_000)]           # report keys
    keys += [f"ww{n % 3000}:wm{n}".encode() for n in range(250_000)]           # customer keys
    keys += ["核心:高意向".encode(), b"", b"\xff" * 7]
    differ = [k for k in keys if murmur2(k) != murmurhash2(k, KAFKA_SEED)]
    assert differ == []
    for count in (1, 4, 12, 100):
        partitions = list(range(count))
        assert all(partitioner(k, partitions, partitions) == DefaultPartitioner()(k, partitions, partitions)
                   for k in keys[::37])


def test_kafka_partition_is_the_masked_hash_modulo_the_partitions():
    for key in (b"a", b"ww1:wm1", os.urandom(64)):
        assert kafka_partition(key, 7) == (murmur2(key) & 0x7FFFFFFF) % 7


def test_a_record_without_a_key_goes_to_an_available_partition():
    assert {partitioner(None, [0, 1, 2], [2]) for _ in range(20)} == {2}
    assert partitioner(None, [0, 1, 2], []) in (0, 1, 2)
