"""Errors as HTTP problems (RFC 9457): one status and title per kind of failure."""

from __future__ import annotations

from drtool.errors import DataUnavailable, DrtoolError, NotPermitted, UsageError, VolumeBusy, VolumeNotFound

PROBLEM_TYPE = "urn:drtool:problem:"


class Problem(Exception):
    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = headers or {}


def status_of(exc: DrtoolError) -> tuple[int, str]:
    if isinstance(exc, UsageError):
        return 400, "Bad request"
    if isinstance(exc, VolumeNotFound):
        return 404, "No such replica"
    if isinstance(exc, NotPermitted):
        return 409, "Conflict"
    if isinstance(exc, DataUnavailable):
        return 410, "No longer available"
    if isinstance(exc, VolumeBusy):
        return 503, "Busy"
    return 500, "Replica server error"


def problem_body(problem: Problem) -> dict[str, object]:
    return {"type": PROBLEM_TYPE + problem.title.lower().replace(" ", "-"), "title": problem.title,
            "status": problem.status, "detail": problem.detail}
