"""`gtpo demo`: the synthetic task, the SFT -> GTPO pipeline, its speed methods and its plots (not a service)."""
