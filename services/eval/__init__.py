"""`gtpo eval`: protocols, metrics with intervals, eval cards, and the in-process or remote evaluation run."""
