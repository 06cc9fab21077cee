"""Tensor and data parallelism on torch.distributed (NCCL on GPU, gloo on CPU).

How the processes fit together (see managers/launcher.py and managers/tp_sync.py):

* `--tp-size N`: one scheduler per rank, each a process holding 1/N of every layer.
  Rank 0 alone receives requests; before each step it broadcasts what arrived since
  the last one (requests, aborts, cache flushes, which grammars finished compiling)
  over a gloo group, so every rank holds the same queues and makes the same
  scheduling decisions. Sampled ids are broadcast from rank 0 over the device group,
  so they agree even if sampling RNG or float rounding differed. Only rank 0 emits.
* `--dp-size N`: N independent replicas (each a TP group with its own world), behind a
  `DataParallelController` that routes each request (`--load-balance-method`).
* `--nnodes M --node-rank K --dist-init-addr HOST:PORT`: the TP world spans M
  machines, tp_size / M ranks on each; node K > 0 runs only its followers
  (`python -m radixserve.launch_server ... --node-rank K` blocks until rank 0 exits).
* Failure: every rank is a child process watched by its launcher; a rank that exits
  takes the server (or the Engine's generate) down with a log line naming it.
  `--dist-timeout` bounds a collective that waits on a rank that hangs.
"""
