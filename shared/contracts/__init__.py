"""Contracts between services: wire payloads, the OpenAI-compatible wire, the start-up agreement check."""
