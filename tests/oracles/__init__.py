"""Test oracles: independent implementations production is checked against, never shipped or selectable.

* `naive`: the recompute-everything decoder (the engines' token and step-map parity, `gtpo eval`'s card tests,
  bench/decode.py's baseline);
* `engine_reference`: the torch engine's loop as it was before its per-step rewrite, frozen;
* `lmdeploy_sim`: LMDeploy's real scheduler classes driven on CPU with a fake model, and a reference decoder.

The tests import them as `oracles.*` (tests/ is on the path); benches and scripts put tests/ on the path first.
"""
