"""Field rules of the contract; every malformed field of a request is reported at once."""

from __future__ import annotations

import re
from collections.abc import Callable

from enrollment.server.domain import page_tokens
from enrollment.server.errors import FieldViolation, InvalidField
from enrollment.server.persistence.models import CODE_MAX, EMAIL_MAX, NAME_MAX

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CODE = re.compile(r"[A-Za-z0-9._-]+")
_WHITESPACE = re.compile(r"\s")


class Fields:
    """Collects violations while cleaning values; `check()` raises them together."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []
        self.metadata: dict[str, str] = {}  # ErrorInfo metadata of the error, if any

    def invalid(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(field, description))

    def check(self) -> None:
        if self.violations:
            raise InvalidField.of(self.violations, self.metadata)

    def required_id(self, field: str, value: int) -> int:
        if value <= 0:
            self.invalid(field, "must be 1 or more")
        return value

    def optional_id(self, field: str, value: int) -> int:
        """An id where 0 means 'no filter'."""
        if value < 0:
            self.invalid(field, "must be 0 (no filter) or an id of 1 or more")
        return value

    def _text(
        self,
        field: str,
        value: str,
        max_length: int,
        rule: Callable[[str], object] | None = None,
        rule_text: str = "",
    ) -> str:
        """The trimmed value; a violation when it holds control characters, is blank,
        is too long, or fails rule (a predicate on the trimmed text)."""
        if _CONTROL.search(value):
            problem = "must not contain control characters"
        else:
            value = value.strip()
            if not value:
                problem = "must not be blank"
            elif len(value) > max_length:
                problem = f"must be at most {max_length} characters"
            elif rule is not None and not rule(value):
                problem = rule_text
            else:
                return value
        self.invalid(field, problem)
        return value

    def token(self, field: str, value: str) -> str:
        """A token the server issued (a page token), as text: a violation when it holds
        control characters ("" then, as if none was sent), else the trimmed value."""
        if _CONTROL.search(value):
            self.invalid(field, "must not contain control characters")
            return ""
        return value.strip()

    def name(self, field: str, value: str) -> str:
        return self._text(field, value, NAME_MAX)

    def email(self, field: str, value: str) -> str:
        return self._text(
            field, value, EMAIL_MAX, _is_email, "must be an email address such as name@example.com"
        )

    def code(self, field: str, value: str) -> str:
        return self._text(
            field, value, CODE_MAX, _CODE.fullmatch, "may hold only A-Z a-z 0-9 . _ -"
        )

    def capacity(self, field: str, value: int) -> int:
        if value < 0:
            self.invalid(field, "must be 0 (unlimited) or more")
        return value

    def waitlist_capacity(self, field: str, value: int) -> int:
        if value < 0:
            self.invalid(field, "must be 0 (no waitlist) or more")
        return value

    def page_request(
        self,
        kind: page_tokens.Kind,
        *,
        filter_field: str,
        filter_id: int,
        page_size: int,
        page_token: str,
    ) -> page_tokens.PageRequest:
        """The filter id (0 = none), page size and page token of a List* request."""
        filter_id = self.optional_id(filter_field, filter_id)
        if page_size < 0:
            self.invalid("page_size", "must be 0 (the default) or more")
        page_token = self.token("page_token", page_token)
        try:
            after_id = page_tokens.decode(page_token, kind=kind, filter_id=filter_id)
        except page_tokens.BadToken as exc:
            self.invalid("page_token", str(exc))
            after_id = 0
        size = page_tokens.effective_page_size(max(page_size, 0))
        return page_tokens.PageRequest(kind, filter_id, size, after_id)


def _is_email(text: str) -> bool:
    if _WHITESPACE.search(text) or text.count("@") != 1:
        return False
    local, domain = text.split("@")
    labels = domain.split(".")
    return bool(local) and len(labels) >= 2 and all(labels)
