"""The round orchestrator (rank 0): enqueue tasks, collect scored groups, lease, publish weights, serve status."""
