"""The chaos run's audit: from the stores alone, prove every request
committed exactly once, the result equals the fenced side effect, no zombie
won and no two holders overlapped; charge re-executions to faults."""

from __future__ import annotations

import json

from ares_celery.exactly_once.identity import job_id_for

NAMESPACE = "ares"


def audit_run(run, requests, outs) -> None:
    """Fill ``run.report`` from the stores and the clients' outputs."""
    report, effects = run.report, run.chaos.effects
    for out in outs:
        if not out.exists():
            report.violations.append(f"client {out.name} did not finish")
            continue
        data = json.loads(out.read_text())
        report.submissions += data["submitted"]
        report.client_retries += data["retries"]
        for rid, job in data["ids"].items():
            if job != job_id_for(NAMESPACE, rid):
                report.violations.append(
                    f"{rid}: submission returned job {job}")
    report.zombies_rejected = len(run.store.xrange(f"{NAMESPACE}:fenced"))
    for rid, _, args in requests:
        _audit_job(run, rid, args)
    report.side_effects_refused = sum(
        int(effects.hget(f"chaos:effect:{job_id_for(NAMESPACE, r)}",
                         "refused") or 0) for r, _, _ in requests)


def _audit_job(run, rid: str, args: list) -> None:
    report, v = run.report, run.report.violations
    job = job_id_for(NAMESPACE, rid)
    meta_raw = run.store.get(f"celery-task-meta-{job}")
    state = run.store.hgetall(f"{NAMESPACE}:job:{job}")
    runs = run.chaos.audit(job)
    report.executions += len(runs)
    if meta_raw is None or b"committed" not in state:
        return  # already reported as lost
    report.committed += 1
    meta = json.loads(meta_raw)
    if meta["status"] != "SUCCESS":
        v.append(f"{rid}: committed {meta['status']}: "
                 f"{meta.get('traceback', '')[-300:]}")
        return
    token = int(state[b"committed"])
    if int(state.get(b"commits", 0)) != 1:
        v.append(f"{rid}: {state.get(b'commits')} accepted commits")
    if meta["result"]["token"] != token or \
            meta["result"]["request"] != args[0]:
        v.append(f"{rid}: result {meta['result']} vs committed {token}")
    effect = run.chaos.effects.hgetall(f"chaos:effect:{job}")
    if int(effect.get(b"token", 0)) != token or \
            effect.get(b"value", b"").decode() != meta["result"]["value"]:
        v.append(f"{rid}: side effect {effect} != committed {token}")
    if runs and int(runs[-1]["token"]) != token:
        v.append(f"{rid}: committed token {token} but a later holder "
                 f"ran with {runs[-1]['token']}: a zombie commit won")
    for before, after in zip(runs, runs[1:], strict=False):
        if "valid" in before and \
                float(before["valid"]) >= float(after["acquired"]):
            v.append(f"{rid}: holders {before['token']} and "
                     f"{after['token']} overlapped: "
                     f"{before['valid']} >= {after['acquired']}")
    for before, after in zip(runs, runs[1:], strict=False):
        report.reexecutions[_blame(report, float(before["acquired"]),
                                        float(after["acquired"]))] += 1


def _blame(report, interrupted: float, rerun: float) -> int | None:
    """The fault a re-execution is charged to: the first one that began
    while the interrupted run was going and before the re-run."""
    for n, fault in enumerate(report.faults):
        if interrupted <= fault.started <= rerun:
            return n
    return None
