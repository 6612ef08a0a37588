"""``Ares(app)``: the entry point that turns a Celery app exactly-once."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import click
from celery import Celery, Task, signals
from kombu.exceptions import OperationalError

from .backends.etcd import BACKEND_PATH as ETCD_BACKEND
from .backends.redis import BACKEND_PATH as REDIS_BACKEND
from .backends.registry import store_class
from .errors import AresWarning, ConfigurationError
from .exactly_once import canvas, context
from .exactly_once import control as _control  # noqa: F401 - registers ares_unrevoke
from .exactly_once.beat import check_beat_schedule
from .exactly_once.context import JobContext
from .exactly_once.eager import EagerRuntime
from .exactly_once.execution import JobRuntime
from .exactly_once.purge import PurgeHook
from .exactly_once.recovery_step import RecoveryStep
from .exactly_once.submission import Submitter, broker_unreachable
from .exactly_once.task import ExactlyOnceTask
from .gpu.eager import EagerGpus
from .gpu.host import GpuHost, HostSlot
from .gpu.host_step import GpuHostStep
from .gpu.policies import DEFAULT_POLICY, POLICIES
from .gpu.priority import DEFAULT_PRIORITY, validate_preemptible, validate_priority
from .gpu.request import GpuRequest
from .gpu.routing import GpuRouter
from .gpu.task import GpuTask
from .observability.worker_step import ObservabilityStep
from .services import Services
from .settings import AresSettings

__all__ = ["ETCD_BACKEND", "REDIS_BACKEND", "Ares", "AresWarning"]


class Ares:
    """Exactly-once tasks and GPU tasks for one Celery app.

    Reads the ``ares_*`` settings from ``app.conf``, checks the Celery
    settings the guarantee depends on, and installs the fenced result
    backend. Create it once, next to the app, before tasks are defined.

    This is the one place that builds the parts and hands each the others
    it needs (services, submitter, job runtime, routers, placement
    policies, the GPU host slot, the worker bootsteps); nothing below it
    looks anything up through it.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.settings = settings = AresSettings.from_conf(app.conf)
        check_serializers(app.conf)
        check_beat_schedule(app.conf)
        store = store_class(settings.result_store)
        app.conf.result_backend = store.result_backend_url(
            app.conf.get("result_backend"), settings)
        warn_on_visibility_timeout(app.conf, settings.lease_ttl)
        self.services = Services(settings, marker_in_etcd=store.marker_in_etcd)
        self.policies = POLICIES
        self.submitter = Submitter(self.services)
        self.runtime = JobRuntime(self.services, lambda: self.app.backend)
        self.router = GpuRouter(self.services, self.policies)
        self.worker_router = GpuRouter(self.services, self.policies,
                                       watch=False)
        #: Filled in GPU worker processes by the worker bootstep.
        self.gpu_slot = HostSlot()
        #: Eager mode (``task_always_eager``, ``apply()``): in memory.
        self.eager = EagerRuntime(settings.namespace, EagerGpus(
            self.policies, settings.cuda_visible_devices))
        collaborators = {"_submitter": self.submitter,
                         "_runtime": self.runtime, "_eager": self.eager,
                         "__module__": __name__}
        self._task_base = type("AresTask", (ExactlyOnceTask,), collaborators)
        self._gpu_task_base = type("AresGpuTask", (GpuTask,), {
            **collaborators, "_router": self.router,
            "_worker_router": self.worker_router,
            "_gpu_slot": self.gpu_slot})
        self._install_router()
        self._install_send_task()
        canvas.register(app, settings.namespace)
        self._install_worker_steps()
        app.ares = self  # for the CLI plugin, which only gets the app
        PurgeHook(app, self.services).install()
        signals.task_postrun.connect(self._on_postrun, weak=False)
        signals.worker_process_shutdown.connect(self._on_shutdown, weak=False)
        signals.worker_shutdown.connect(self._on_shutdown, weak=False)
        signals.worker_init.connect(self._on_worker_init, weak=False)
        signals.beat_init.connect(self._on_beat_init, weak=False)

    @property
    def gpu_worker(self) -> GpuHost | None:
        """This worker's GPU host, if it is one (old name of
        ``gpu_slot.host``)."""
        return self.gpu_slot.host

    # -- decorators --------------------------------------------------------

    def task(self, *args: Any, **options: Any) -> Any:
        """``@ares.task`` or ``@ares.task(name=..., **celery_options)``."""
        return self._decorator("task", args, options, self._task_base)

    def gpu_task(self, *args: Any, gpus: int = 1,
                 min_memory_gb: float | None = None,
                 interconnect: str | None = None,
                 placement: str = DEFAULT_POLICY,
                 priority: int = DEFAULT_PRIORITY, preemptible: bool = False,
                 **options: Any) -> Any:
        """``@ares.gpu_task(gpus=4, min_memory_gb=40, interconnect="nvlink")``:
        an exactly-once task routed to the host where those GPUs are best
        connected, run with ``CUDA_VISIBLE_DEVICES`` set to them.
        ``placement`` names the placement policy (see ``gpu.policies``).
        ``priority`` (0-9, higher is more urgent; ``apply_async(priority=)``
        overrides it per call) orders the jobs waiting for GPUs;
        ``preemptible=True`` lets a more urgent job stop this one."""
        options["gpu_request"] = GpuRequest(gpus, min_memory_gb, interconnect,
                                            policy=placement)
        options["gpu_priority"] = validate_priority(priority)
        options["preemptible"] = validate_preemptible(preemptible)
        return self._decorator("gpu_task", args, options, self._gpu_task_base)

    def _decorator(self, name: str, args: tuple, options: dict[str, Any],
                   default_base: type) -> Any:
        """Both decorator forms: bare ``@ares.task`` and ``@ares.task(...)``."""
        if len(args) == 1 and callable(args[0]):
            return self._make_task(args[0], options, default_base)
        if args:
            raise TypeError(f"ares.{name} takes only keyword options")

        def decorate(fun: Callable[..., Any]) -> Task:
            return self._make_task(fun, options, default_base)
        return decorate

    def _make_task(self, fun: Callable[..., Any], options: dict[str, Any],
                   default_base: type) -> Task:
        limit = options.get("max_attempts")
        if limit is not None and (isinstance(limit, bool)
                                  or not isinstance(limit, int) or limit < 1):
            raise ConfigurationError(
                f"max_attempts must be an int >= 1, got {limit!r}")
        for flag in ("acks_late", "reject_on_worker_lost"):
            if options.get(flag, True) is not True:
                raise ConfigurationError(
                    f"{flag}=False would let a lost worker drop the job; "
                    "exactly-once tasks require it to be True")
        serializer = options.get("serializer")
        if serializer not in (None, "json"):
            raise ConfigurationError(
                f"serializer={serializer!r}: exactly-once tasks use JSON only")
        if "preemptible" in options and "gpu_request" not in options:
            raise ConfigurationError(
                "preemptible applies to GPU tasks only (a more urgent job "
                "takes a preempted job's GPUs); use ares.gpu_task(...)")
        options = dict(options)
        # Celery shares app.task tasks with every app created later in the
        # process; an exactly-once task carries this Ares' submitter,
        # runtime and store, so in another app it would lock, fence and
        # commit through the wrong ones. It belongs to its own app.
        if options.setdefault("shared", False):
            raise ConfigurationError(
                "shared=True: an exactly-once task belongs to the app its "
                "Ares was built for; decorate it with each app's ares")
        base = options.pop("base", None)
        if base is None:
            base = default_base
        elif not issubclass(base, default_base):
            base = type(f"Ares{base.__name__}", (default_base, base), {
                "__module__": base.__module__})
        return self.app.task(fun, base=base, acks_late=True,
                             reject_on_worker_lost=True, **options)

    # -- runtime -----------------------------------------------------------

    @staticmethod
    def current() -> JobContext:
        """Inside an exactly-once task: its job id, request id, fencing
        token and lease state."""
        return context.current()

    def _install_router(self) -> None:
        routes = self.app.conf.task_routes
        if routes is None:
            routes = ()
        elif isinstance(routes, (dict, str)) or callable(routes):
            routes = (routes,)
        self.app.conf.task_routes = (self.router, *routes)

    def _install_send_task(self) -> None:
        """``app.send_task(name, ..., request_id=...)`` dedups like
        ``apply_async`` (Celery itself would drop the unknown option)."""
        celery_send_task = self.app.send_task
        submitter = self.submitter

        def send_task(name: str, args: Any = None, kwargs: Any = None,
                      *more: Any, request_id: Any = None,
                      **options: Any) -> Any:
            if request_id is None:
                return celery_send_task(name, args, kwargs, *more, **options)
            if more:
                raise TypeError("send_task with request_id takes its "
                                "options as keywords")
            task = self.app.tasks.get(name)
            if isinstance(task, ExactlyOnceTask) \
                    and task._submitter is submitter:
                return task.apply_async(args, kwargs,
                                        request_id=request_id, **options)
            if task is not None:
                raise ConfigurationError(
                    f"{name} is not an exactly-once task: its request_id "
                    "would be ignored; define it with ares.task (or drop "
                    "request_id)")

            def publish(args: Any, kwargs: Any, task_id: str | None,
                        options: dict[str, Any]) -> Any:
                try:
                    return celery_send_task(name, args, kwargs,
                                            task_id=task_id, **options)
                except OperationalError as exc:
                    raise broker_unreachable(self.app, exc) from exc
            task_id = options.pop("task_id", None)
            return submitter.send_task(self.app, name, args, kwargs, task_id,
                                       request_id, options, publish)
        self.app.send_task = send_task

    def _install_worker_steps(self) -> None:
        steps = self.app.steps["worker"]
        steps.add(GpuHostStep.bound(self.settings, self.services,
                                    self.policies, self.worker_router,
                                    self.gpu_slot))
        steps.add(ObservabilityStep.bound(self.settings))
        steps.add(RecoveryStep.bound(self.settings, self.services))
        options = self.app.user_options["worker"]
        options.add(click.Option(
            ["--ares-mock-gpus"], default=None,
            help="ares: pretend this host has a mock GPU topology (a name "
                 "such as dgx1-v100, or a topo -m / JSON file)"))
        options.add(click.Option(
            ["--ares-host"], default=None,
            help="ares: host identity for GPU routing (default: the part "
                 "of the node name after @)"))
        options.add(click.Option(
            ["--ares-metrics-port"], default=None,
            help="ares: serve Prometheus /metrics on this port (or "
                 "host:port); overrides ares_metrics_port"))

    def _on_postrun(self, sender: Any = None, task_id: str | None = None,
                    task: Any = None, **_: Any) -> None:
        if isinstance(task, ExactlyOnceTask) and \
                task._runtime is self.runtime and task_id:
            task._finish_job(task_id)

    def _on_worker_init(self, sender: Any = None, **_: Any) -> None:
        # Settings may have been changed after Ares(app); check again.
        check_serializers(self.app.conf)
        warn_on_visibility_timeout(self.app.conf, self.settings.lease_ttl)

    def _on_beat_init(self, sender: Any = None, **_: Any) -> None:
        """``beat_schedule`` may be set after ``Ares(app)``, and only here
        is the scheduler known (a plain one sends a ``{slot}`` template
        literally). Celery logs and swallows a signal handler's exception,
        so a bad schedule ends beat with SystemExit instead."""
        if sender is None or sender.app is not self.app:
            return
        try:
            check_beat_schedule(sender.app.conf,
                                scheduler=sender.scheduler_cls)
        except ConfigurationError as exc:
            raise SystemExit(f"ares: {exc}") from exc

    def _on_shutdown(self, **_: Any) -> None:
        self.services.close()


def check_serializers(conf: Any) -> None:
    """Exactly-once needs JSON: pickle lets a message run arbitrary code and
    makes the dedup digest and stored results unportable."""
    offenders = []
    for key in ("task_serializer", "result_serializer"):
        if conf.get(key) not in (None, "json"):
            offenders.append(f"{key}={conf.get(key)!r}")
    for key in ("accept_content", "result_accept_content"):
        accepted = conf.get(key)
        if accepted is None:
            continue
        accepted = [accepted] if isinstance(accepted, str) else list(accepted)
        bad = [c for c in accepted if c not in ("json", "application/json")]
        if bad:
            offenders.append(f"{key} includes {bad!r}")
    if offenders:
        raise ConfigurationError(
            "exactly-once tasks require JSON serialization only: "
            + "; ".join(offenders))


def warn_on_visibility_timeout(conf: Any, lease_ttl: int) -> None:
    options = conf.get("broker_transport_options") or {}
    visibility = options.get("visibility_timeout", 3600)
    if visibility <= lease_ttl:
        warnings.warn(
            f"broker visibility_timeout={visibility}s is not larger than "
            f"ares_lease_ttl={lease_ttl}s: a message may be redelivered while "
            "its lease holder is still alive, causing needless deferrals",
            AresWarning, stacklevel=3)
