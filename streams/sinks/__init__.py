"""Delivering reports: the reporting sink and the Marketing API client.

- `reporting`: `tagstream sink`, from the outbound topic to the API, a file or stdout, once per
  `outer_action_id`;
- `marketing_api`: `user_actions/add` as SPEC §5 describes it (packing, codes, retries).
"""
