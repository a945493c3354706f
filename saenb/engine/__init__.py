"""The engine: splice perturbed activations into the model and measure the next-token distribution.

`patching` (measure, measure_naive: the fast path and its plain reference), `interventions` (what is spliced in),
`metrics` (KL, CE, geometry, CIs), `kernels` (fused forwards for the fast path), `store` (results cached as
parquet, resumable), `distributed` (the same work as Ray tasks)."""
