"""Prefill/decode disaggregation: the KV page layout both sides agree on, the copy of
pages by address, and the per-request pairing of a prefill and a decode server.

First part only: no server or scheduler wiring yet (see docs/disaggregation.md).
"""
