"""Actors of the worker process (docs/design.md), wired by actors/supervisor.py."""
