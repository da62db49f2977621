"""Batch jobs: the JSONL job behind `genarm-vllm generate` (batch.py) and what only it uses
(continuous feeding, the in-order reorder buffer, the settings fingerprint for resume,
progress), plus its scale-out on a Ray cluster (ray_job.py)."""
