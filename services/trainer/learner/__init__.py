"""The learner: SFT and the GTPO objective, its trajectories, checkpoints, sharding and LoRA training."""
