"""The records every layer shares: Req, ScheduleBatch, ForwardBatch, SamplingParams, BatchResult.

The bottom layer of the package (above device_utils only): it imports nothing else from radixserve.
"""
