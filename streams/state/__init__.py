"""The worker's state: RocksDB per partition with a compacted changelog, crash-consistent.

- `store`: `ChangeloggedStore`, committed and restored in batches;
- `local`: when local RocksDB files may be trusted after an exit;
- `failpoints`: crash the worker at an exact step of its commit path (for crash tests).
"""
