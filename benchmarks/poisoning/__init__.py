"""Poisoning study on real processes: honest sites plus hostile trainers (a test facility)."""
