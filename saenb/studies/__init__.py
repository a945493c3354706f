"""The studies: one module per notebook question, each built on the engine.

`pathology` and `scoring` (the pathology score and its command-line eval), `tokens` (notebook 04), `nfm`
(notebook 06), `proxy` (notebook 07), `fixes` (notebook 08), `baselines`, `curvature` and `why` (notebook 09)."""
