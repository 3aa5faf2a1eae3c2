"""Delivering reports: the reporting sink and the Marketing API client.

- `reporting`: `tagstream sink`, from the outbound topic to the API, a file or stdout, once per
  `outer_action_id`; reports of an account the API keeps refusing are parked on the retry
  topic and retried beside the main flow;
- `parking`: the pure parts of those non-blocking retries (the record's states, the retry
  copy's envelope, the per-account breaker);
- `marketing_api`: `user_actions/add` as SPEC §5 describes it (packing, codes, retries).
"""
