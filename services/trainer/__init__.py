"""The trainer: joins a task, trains on its site's data, publishes deltas."""
