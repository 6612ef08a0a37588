"""The GPU example's Celery app: one exactly-once 4-GPU training task.

``@ares.gpu_task(gpus=4, interconnect="nvlink")`` routes each job to the host
whose free GPUs form the best NVLink ring, and the worker hands the job
exactly those GPUs (``CUDA_VISIBLE_DEVICES``). The "training" here only
records where it ran; a real job would start its framework on the visible
devices and write checkpoints fenced with ``ctx.fencing_token``.
"""

from __future__ import annotations

import os
import time

import redis

from examples.example_app import make_app

app, ares = make_app("gpu_training")
store = redis.Redis.from_url(app.conf.broker_url)


@ares.gpu_task(name="gpu_training.train", gpus=4, interconnect="nvlink")
def train(model: str, steps: int = 100, seconds: float = 0.5) -> dict:
    ctx = ares.current()
    start = time.time()
    store.incr(f"train:executions:{ctx.job_id}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    print(f"train {model}: host {ctx.host} GPUs {ctx.gpus} "
          f"CUDA_VISIBLE_DEVICES={visible} token {ctx.fencing_token}", flush=True)
    time.sleep(seconds)  # stands in for `steps` training steps
    ctx.check()          # our lease must still be live before we report
    return {"model": model, "steps": steps, "host": ctx.host, "gpus": ctx.gpus,
            "gpu_uuids": ctx.gpu_uuids, "cuda_visible_devices": visible,
            "placement_score": ctx.placement_score,
            "fencing_token": ctx.fencing_token, "job_id": ctx.job_id,
            "worker_pid": os.getpid(), "start": start, "end": time.time()}
