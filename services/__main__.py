"""`python -m services ...` runs the gtpo CLI (what `accelerate launch -m services` needs)."""

from services.cli import app

app()
