"""Checkpoint resolution (hub.py), key mapping (keys.py) and strict, mmapped loading (loader.py)."""
