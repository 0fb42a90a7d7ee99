"""Actors of the worker process (SPEC §4), wired by actors/supervisor.py."""
