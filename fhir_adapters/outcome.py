"""OperationOutcome construction and the explanation of invalid resources by fhir.resources."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from pydantic import ValidationError

FhirVersion = Literal["R4", "R5"]


@dataclass(frozen=True)
class Issue:
    code: str  # an IssueType code: invalid, structure, required, value, not-found, too-long, ...
    diagnostics: str
    expression: str | None = None
    severity: str = "error"

    def to_fhir(self) -> dict[str, Any]:
        issue: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            issue["expression"] = [self.expression]
        return issue


def operation_outcome(issues: list[Issue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in issues]}


@lru_cache(maxsize=512)
def model_class(resource_type: str, version: FhirVersion) -> Any | None:
    """The fhir.resources model of a resource type, or None if the type does not exist."""
    if not resource_type or not resource_type.isalnum() or not resource_type[0].isupper():
        return None
    try:
        if version == "R5":
            from fhir.resources import get_fhir_model_class as get_r5
            from fhir.resources.resource import Resource as base

            cls = get_r5(resource_type)
        else:
            from fhir.resources.R4B import get_fhir_model_class as get_r4b
            from fhir.resources.R4B.resource import Resource as base  # type: ignore[assignment]

            cls = get_r4b(resource_type)
    except (ValueError, KeyError, ImportError, AttributeError):
        return None
    # Datatypes (Coding, Quantity, ...) and the abstract Resource/DomainResource are models too.
    if not isinstance(cls, type) or not issubclass(cls, base):
        return None
    return None if resource_type in ("Resource", "DomainResource") else cls


def _expression(resource_type: str, loc: tuple[Any, ...]) -> str:
    parts = [resource_type]
    for item in loc:
        if isinstance(item, int):
            parts[-1] += f"[{item}]"
        else:
            parts.append(str(item))
    return ".".join(parts)


def validate_with_models(resource: dict[str, Any], version: FhirVersion) -> list[Issue]:
    """Full validation with fhir.resources; the issues it finds (empty when valid)."""
    resource_type = resource.get("resourceType")
    cls = model_class(resource_type, version) if isinstance(resource_type, str) else None
    if cls is None:
        return [
            Issue(
                "not-supported",
                f"unknown resource type {resource_type!r} in FHIR {version}",
                "resourceType",
            )
        ]
    try:
        cls.model_validate(resource)
    except ValidationError as exc:
        return [
            Issue(
                "required"
                if err["type"] == "missing"
                else "structure"
                if err["type"] == "extra_forbidden"
                else "value",
                f"{err['msg']} (fhir.resources {version})",
                _expression(str(resource_type), tuple(err["loc"])),
            )
            for err in exc.errors()[:20]
        ]
    except Exception as exc:  # its validators raise KeyError etc. on some garbage: still invalid
        return [Issue("invalid", f"{exc} (fhir.resources {version})", str(resource_type))]
    return []
