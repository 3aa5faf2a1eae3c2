"""The `tagstream` command line and the demo.

- `main`: one entry point for every part of the pipeline (`tagstream --help`);
- `demo`: `tagstream run`, the whole pipeline on the local broker with a generated load;
- `progress`: progress lines for long runs.
"""
