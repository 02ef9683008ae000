"""Errors as HTTP problems (RFC 9457): one status, title and type per kind of failure.

The type URN is what clients branch on (``drtool.client`` maps ``conflict`` to
Conflict and every other 409 to NotPermitted); the title is for people.
"""

from __future__ import annotations

from drtool.errors import (Conflict, DataUnavailable, DrtoolError, GroupNotFound, NotPermitted, UsageError,
                           VolumeBusy, VolumeNotFound)

PROBLEM_TYPE = "urn:drtool:problem:"


class Problem(Exception):
    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None,
                 kind: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = headers or {}
        self.kind = kind or title.lower().replace(" ", "-")


class RoleRefused(NotPermitted):
    """The replica's role state (released, promoted) forbids the request: a 409 with its own title."""

    def __init__(self, message: str, title: str, kind: str) -> None:
        super().__init__(message)
        self.title = title
        self.kind = kind


def promoted_refusal(name: str, what: str) -> RoleRefused:
    return RoleRefused(f"volume {name} was promoted on this host: {what}",
                       f"volume {name} was promoted on this host", "promoted")


def status_of(exc: DrtoolError) -> tuple[int, str, str]:
    """(status, title, type slug) of an error raised while handling a request."""
    if isinstance(exc, RoleRefused):
        return 409, exc.title, exc.kind
    if isinstance(exc, UsageError):
        return 400, "Bad request", "bad-request"
    if isinstance(exc, VolumeNotFound):
        return 404, "No such replica", "no-such-replica"
    if isinstance(exc, GroupNotFound):
        return 404, "No such group", "no-such-group"
    if isinstance(exc, Conflict):
        return 409, "Conflict", "conflict"
    if isinstance(exc, NotPermitted):
        return 409, "Not permitted", "not-permitted"
    if isinstance(exc, DataUnavailable):
        return 410, "No longer available", "no-longer-available"
    if isinstance(exc, VolumeBusy):
        return 503, "Busy", "busy"
    return 500, "Replica server error", "replica-server-error"


def problem_body(problem: Problem) -> dict[str, object]:
    return {"type": PROBLEM_TYPE + problem.kind, "title": problem.title,
            "status": problem.status, "detail": problem.detail}
