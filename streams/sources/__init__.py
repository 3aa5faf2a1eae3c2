"""Where events come from when WeCom is not in the loop: the generated load used by the demo,
the benchmarks and the tests. (WeCom's own callbacks become events in `streams/wecom/`.)

- `loadgen`: a realistic generated stream of tag traffic, rules included.
"""
