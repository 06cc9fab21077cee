"""Prefill/decode disaggregation: a prefill server computes each prompt's KV and its
first token, a decode server receives the KV pages and decodes (docs/disaggregation.md).

Each is a role behind the scheduler's role seam (managers/request_role.py): prefill.py
and decode.py. bootstrap.py pairs the two halves of a request by its bootstrap_room,
transfer.py moves the pages, kv_layout.py says where they are.
"""
