"""Which patients a clinician may see (invariant: identity stays home).

A clinician sees a candidate or invitation when

* the patient's registered GP (``general_practitioners`` of their Patient record) is the
  clinician's Practitioner reference key, or
* it is at one of the sites in the clinician's token where the clinician is the trial recruiter:
  named as the trial's recruiter for that site, or holding a trial-recruiter role there.

Everything else is invisible: the API answers 404 for it, as if it did not exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import InstrumentedAttribute, Session

from .models import PatientPractitioner, TrialSite
from .service import SqlDirectory


@dataclass(frozen=True)
class ClinicianScope:
    practitioner: str
    sites: tuple[str, ...]
    #: Of ``sites``, those where the practitioner holds a trial-recruiter role.
    recruiter_sites: tuple[str, ...]

    @classmethod
    def resolve(cls, session: Session, practitioner: str, sites: Sequence[str]) -> ClinicianScope:
        directory = SqlDirectory(session)
        return cls(
            practitioner, tuple(sites), tuple(directory.recruiter_sites(practitioner, sites))
        )

    def clause(
        self,
        patient: InstrumentedAttribute[str],
        site: InstrumentedAttribute[str],
        trial: InstrumentedAttribute[str],
    ) -> sa.ColumnElement[bool]:
        """A WHERE clause over a table with patient, site and trial columns."""
        clauses: list[sa.ColumnElement[bool]] = [
            sa.exists().where(
                PatientPractitioner.patient == patient,
                PatientPractitioner.practitioner == self.practitioner,
            )
        ]
        if self.recruiter_sites:
            clauses.append(site.in_(self.recruiter_sites))
        if self.sites:
            clauses.append(
                sa.and_(
                    site.in_(self.sites),
                    sa.exists().where(
                        TrialSite.trial_id == trial,
                        TrialSite.site == site,
                        TrialSite.recruiter == self.practitioner,
                    ),
                )
            )
        return sa.or_(*clauses)


__all__ = ["ClinicianScope"]
