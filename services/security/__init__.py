"""Operator tools for fedmq's security: trainer key pairs (`fedmq keys`)."""
