"""Where ares keeps things: the key layout of one namespace in Redis and
etcd, in one place so every reader and writer agrees (and tests need not
hard-code it)."""

from __future__ import annotations


class Keys:
    """Key layout of one namespace in Redis and etcd."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    def dedup(self, request_id: str) -> str:
        return f"{self.namespace}:dedup:{request_id}"

    def job(self, job_id: str) -> str:
        """Redis hash with the job's fence (highest token) and commit."""
        return f"{self.namespace}:job:{job_id}"

    def fenced_log(self) -> str:
        """Redis stream recording every rejected (fenced) commit."""
        return f"{self.namespace}:fenced"

    def lock_prefix(self) -> str:
        return f"/{self.namespace}/locks/"

    def lock(self, job_id: str) -> str:
        return f"{self.lock_prefix()}{job_id}"

    def result(self, job_id: str) -> str:
        return f"/{self.namespace}/results/{job_id}"

    def done(self, job_id: str) -> str:
        return f"/{self.namespace}/done/{job_id}"

    def fenced(self, job_id: str, token: int) -> str:
        return f"/{self.namespace}/fenced/{job_id}/{token}"

    def inventory_prefix(self) -> str:
        return f"/{self.namespace}/inventory/"

    def inventory_topology(self, host: str) -> str:
        """A host's topology (rarely changes), attached to its lease."""
        return f"/{self.namespace}/inventory/{host}/topology"

    def inventory_state(self, host: str) -> str:
        """A host's free/busy GPUs (changes per job), attached to its lease."""
        return f"/{self.namespace}/inventory/{host}/state"

    def host_queues(self) -> str:
        """Redis hash: every GPU host ever registered -> its queue (the
        janitor drains the queues of hosts that left the inventory)."""
        return f"{self.namespace}:gpu:queues"
