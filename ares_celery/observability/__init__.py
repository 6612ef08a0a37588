"""What operators watch: Prometheus metrics and the task events Flower shows.

Both are side channels: recording a metric or sending an event never
changes what a job does, and a failure to record one never fails a job.
"""
