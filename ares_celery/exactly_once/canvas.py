"""A request id on a chain, group or chord names the whole workflow.

Celery freezes a workflow's members with random task ids before the first
message goes out, and hands ``apply_async`` options to some members only
(a chain passes them to its first step). So a ``request_id`` given to the
workflow cannot simply travel down: it would contradict the frozen ids, or
name every member of a group the same job. Instead, before Celery freezes
anything, every member is named after the workflow's request id and its
place in it (``<request id>#<path>``, path like ``1.0`` or ``2.b`` for a
chord body): an ares task gets that as its own request id (and the job id
derived from it), a plain Celery task gets the derived id as its task id.
A retried submission of the same workflow therefore names the same jobs,
runs each once, and returns the same result ids.

The request ids travel in the members' options, so the steps a worker
publishes later (the rest of a chain, a chord body) are deduped as well.

Celery has no hook before its workflows freeze, so the composite
signatures' ``apply_async``/``apply`` are wrapped once per process;
workflows without any request id pass through untouched.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from celery import canvas

from ..errors import ConfigurationError, InvalidRequestId
from .identity import job_id_for, validate_request_id
from .task import ExactlyOnceTask, refuse_looped

#: The ``ares_namespace`` of each app that has an ``Ares``.
_namespaces: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register(app: Any, namespace: str) -> None:
    """Workflows of ``app`` name their jobs in ``namespace``."""
    _namespaces[app] = namespace
    _install()


def _install() -> None:
    for cls in (canvas._chain, canvas.group, canvas._chord):
        for method in ("apply_async", "apply"):
            original = cls.__dict__[method]
            if getattr(original, "__ares_named__", False):
                continue
            setattr(cls, method, _naming(original))


def _naming(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def apply(self: canvas.Signature, args: Any = None, kwargs: Any = None,
              **options: Any) -> Any:
        request_id = options.pop("request_id", None)
        if request_id is None:
            request_id = self.options.pop("request_id", None)
        name_workflow(self, request_id)
        return original(self, args, kwargs, **options)
    apply.__ares_named__ = True
    return apply


def name_workflow(sig: canvas.Signature, request_id: Any = None) -> None:
    """Give every member of ``sig`` its deterministic name (in place).

    ``request_id`` names the workflow; without it, the first member that
    carries its own request id (``.set(request_id=...)``) names it, so a
    retry of the whole workflow never re-runs the steps before that member.
    """
    members = list(_leaves(sig, ""))
    if request_id is None:
        request_id = next((leaf.options["request_id"] for leaf, _ in members
                           if leaf.options.get("request_id") is not None),
                          None)
        if request_id is None:
            return
    workflow = validate_request_id(request_id)
    namespace = _namespace(sig, members)
    named = False
    for leaf, path in members:
        named |= _name_leaf(leaf, f"{workflow}#{path}", namespace)
    if not named:
        raise InvalidRequestId(
            f"request_id {workflow!r} was given to a workflow without any "
            "exactly-once task; only tasks defined with ares.task or "
            "ares.gpu_task honour a request id")
    for group_sig, path in _composites(sig, ""):
        group_sig.options.setdefault(
            "task_id", job_id_for(namespace, f"{workflow}#{path}g"))


def _name_leaf(leaf: canvas.Signature, derived: str, namespace: str) -> bool:
    """Name one task; True if it is (or may be, by name only) ares."""
    options = leaf.options
    task = _task_type(leaf)
    if task is not None and not isinstance(task, ExactlyOnceTask):
        if options.get("request_id") is not None:
            raise ConfigurationError(
                f"{leaf.task} is not an exactly-once task: its "
                "request_id would be ignored; define it with ares.task")
        options.setdefault("task_id", job_id_for(namespace, derived))
        return False
    own = options.get("request_id")
    if own is None and "task_id" in options:
        return True  # named by its explicit task id (deduped by it)
    rid = validate_request_id(own) if own is not None else derived
    job_id = job_id_for(namespace, rid)
    if options.setdefault("task_id", job_id) != job_id:
        raise InvalidRequestId(
            f"{leaf.task}: task_id {options['task_id']!r} contradicts its "
            f"request id {rid!r} (job id {job_id}); was the workflow "
            "frozen before it was given a request id?")
    options["request_id"] = rid
    return True


def _leaves(sig: Any, path: str) -> Iterator[tuple[canvas.Signature, str]]:
    """Every task signature of the workflow with its place in it."""
    for child, child_path in _children(sig, path):
        if child is None:
            continue
        if _is_composite(child):
            yield from _leaves(child, child_path)
        else:
            yield child, child_path
    if not _is_composite(sig):
        yield sig, path or "0"


def _composites(sig: Any, path: str) -> Iterator[tuple[Any, str]]:
    """Groups and chords, whose (header) group id should be stable too."""
    if isinstance(sig, (canvas.group, canvas._chord)):
        yield sig, path
    for child, child_path in _children(sig, path):
        if child is not None and _is_composite(child):
            yield from _composites(child, child_path)


def _children(sig: Any, path: str) -> Iterator[tuple[Any, str]]:
    prefix = f"{path}." if path else ""
    if isinstance(sig, canvas._chord):
        for i, member in enumerate(_materialized(sig, "header")):
            yield _signature(member, sig), f"{prefix}{i}"
        yield _signature(sig.body, sig), f"{prefix}b"
    elif isinstance(sig, (canvas._chain, canvas.group)):
        for i, member in enumerate(_materialized(sig, "tasks")):
            yield _signature(member, sig), f"{prefix}{i}"
    elif isinstance(sig, (canvas._basemap, canvas.chunks)):
        task = _task_type(_signature(sig.kwargs["task"], sig))
        if isinstance(task, ExactlyOnceTask):
            raise refuse_looped(task.name, sig.task)


def _materialized(sig: Any, key: str) -> list[Any]:
    """The members as a list (Celery keeps generators lazily)."""
    members = sig.kwargs[key] if key == "header" else sig.tasks
    if key == "header" and isinstance(members, canvas.group):
        return list(members.tasks)
    if not isinstance(members, list):
        members = list(members)
        if key == "header":
            sig.kwargs[key] = members
        else:
            sig.kwargs["tasks"] = members
    return members


def _signature(member: Any, parent: Any) -> Any:
    if member is None or isinstance(member, canvas.Signature):
        return member
    return canvas.maybe_signature(member, app=parent._app)


def _is_composite(sig: Any) -> bool:
    return isinstance(sig, (canvas._chain, canvas.group, canvas._chord,
                            canvas._basemap, canvas.chunks))


def _task_type(leaf: canvas.Signature) -> Any:
    """The task object if this process knows it (None: by name only)."""
    try:
        return leaf.app.tasks.get(leaf.task)
    except Exception:  # noqa: BLE001 - an app that cannot finalize here
        return None


def _namespace(sig: canvas.Signature,
               members: list[tuple[canvas.Signature, str]]) -> str:
    for leaf, _ in members:
        task = _task_type(leaf)
        if isinstance(task, ExactlyOnceTask):
            return task._submitter.namespace
    namespace = _namespaces.get(sig.app)
    if namespace is None:
        raise ConfigurationError(
            "a workflow with a request_id needs an app with Ares(app): "
            f"{sig.app} has none")
    return namespace
