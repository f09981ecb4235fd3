"""`python -m services.reward`: serve the reward service with settings from `GTPO_REWARD_*`."""

from services.reward.app import serve

# the guard matters: verifier workers are spawned, and spawn re-imports the main module
if __name__ == "__main__":
    serve()
