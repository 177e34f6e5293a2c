"""Corolla's version, announced to the swarm so peers can tell old servers apart."""

__version__ = "0.1.0"
