"""Expert parallelism: sharded experts with all-to-all dispatch (ep_moe.py), their
placement (expert_location.py), EPLB (eplb_algorithm.py, ep_runtime.py) and the
expert-load recorder (expert_distribution.py). See docs/parallelism.md."""
