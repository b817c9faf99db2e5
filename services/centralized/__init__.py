"""The centralised baseline: the federated task's model trained on the pooled data in one process.

The API is in `services.centralized.trainer` (`run_centralized`, `CentralizedConfig`); this
package imports nothing heavy so `fedmq --help` stays fast.
"""
