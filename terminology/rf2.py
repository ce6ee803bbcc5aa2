"""Reading a SNOMED CT release in RF2 (Release Format 2), as NHS TRUD distributes it.

A release is a folder or a zip holding, per edition (the International Edition, the UK Clinical
Extension, the UK Drug Extension; or one "monolith" with all of them), tab-separated UTF-8 files
with a header row. Only the *Snapshot* files are read (the current state of every component):

* ``sct2_Concept_*Snapshot*``: ``id effectiveTime active moduleId definitionStatusId``;
* ``sct2_Description_*Snapshot-en*``: ``id effectiveTime active moduleId conceptId languageCode
  typeId term caseSignificanceId`` (typeId ``900000000000003001``: fully specified name;
  ``900000000000013009``: synonym);
* ``sct2_Relationship_*Snapshot*`` (not ``StatedRelationship``, not ``ConcreteValues``):
  ``id effectiveTime active moduleId sourceId destinationId relationshipGroup typeId
  characteristicTypeId modifierId``; is-a is typeId ``116680003``, source the child,
  destination the parent;
* ``der2_cRefset_Language*Snapshot*``: ``id effectiveTime active moduleId refsetId
  referencedComponentId acceptabilityId`` (``900000000000548007`` preferred,
  ``900000000000549004`` acceptable), which says which synonym is a concept's preferred term
  in a dialect.

Files are read whole with polars (no quoting: RF2 terms may contain quote characters). Should
an id appear twice (a Full file passed by mistake), the row with the latest effectiveTime is
the one kept, which is what a Snapshot is.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

IS_A = 116680003
FSN = 900000000000003001
SYNONYM = 900000000000013009
PREFERRED = 900000000000548007
ACCEPTABLE = 900000000000549004
#: The root concept, "SNOMED CT Concept (SNOMED RT+CTV3)".
ROOT = 138875005
#: The International Edition's core module.
CORE_MODULE = 900000000000207008
#: Language reference sets, most preferred first: the UK clinical and pharmacy English
#: dialects, then GB English, then US English.
DEFAULT_LANGUAGE_REFSETS = (
    999001261000000100,
    999000691000001104,
    900000000000508004,
    900000000000509007,
)

CONCEPT_COLUMNS = ["id", "effectiveTime", "active", "moduleId", "definitionStatusId"]
DESCRIPTION_COLUMNS = [
    "id",
    "effectiveTime",
    "active",
    "moduleId",
    "conceptId",
    "languageCode",
    "typeId",
    "term",
    "caseSignificanceId",
]
RELATIONSHIP_COLUMNS = [
    "id",
    "effectiveTime",
    "active",
    "moduleId",
    "sourceId",
    "destinationId",
    "relationshipGroup",
    "typeId",
    "characteristicTypeId",
    "modifierId",
]
LANGUAGE_COLUMNS = [
    "id",
    "effectiveTime",
    "active",
    "moduleId",
    "refsetId",
    "referencedComponentId",
    "acceptabilityId",
]

_DATE_IN_NAME = re.compile(r"_(\d{8})(?:T\d+Z?)?\.txt$")


class ReleaseError(ValueError):
    """The path is not a readable RF2 release (what is missing or wrong is in the message)."""


@dataclass(frozen=True)
class Rf2File:
    name: str
    kind: str  # concept, description, relationship, language


def _kind(name: str) -> str | None:
    base = name.rsplit("/", 1)[-1]
    if not base.endswith(".txt") or "Snapshot" not in base:
        return None
    if base.startswith("sct2_Concept_"):
        return "concept"
    if base.startswith("sct2_Description_") and "Snapshot-en" in base:
        return "description"
    if base.startswith("sct2_Relationship_") and "Concrete" not in base:
        return "relationship"
    if base.startswith("der2_cRefset_Language") and "Snapshot" in base:
        return "language"
    return None


class Release:
    """The Snapshot files of a release folder or zip (every edition inside it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        if path.is_dir():
            names = [str(p.relative_to(path)) for p in sorted(path.rglob("*.txt"))]
        elif path.is_file() and zipfile.is_zipfile(path):
            self._zip = zipfile.ZipFile(path)
            names = sorted(self._zip.namelist())
        else:
            raise ReleaseError(f"{path} is neither a folder nor a zip file")
        self.files = [Rf2File(n, k) for n in names if (k := _kind(n)) is not None]
        for needed in ("concept", "description", "relationship"):
            if not any(f.kind == needed for f in self.files):
                raise ReleaseError(
                    f"{path} has no {needed} Snapshot file "
                    f"(sct2_{needed.capitalize()}_...Snapshot...txt): is it an RF2 release?"
                )

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def __enter__(self) -> Release:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def names(self, kind: str) -> list[str]:
        return [f.name for f in self.files if f.kind == kind]

    def release_date(self) -> str | None:
        """The release date in the Snapshot files' names (``..._20240410.txt``), latest."""
        dates = [m.group(1) for f in self.files if (m := _DATE_IN_NAME.search(f.name))]
        return max(dates) if dates else None

    def _bytes(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(name)
        return (self.path / name).read_bytes()

    def _frame(self, name: str, columns: list[str], schema: dict[str, Any]) -> pl.DataFrame:
        data = self._bytes(name)
        header = data.split(b"\n", 1)[0].decode("utf-8-sig").rstrip("\r").split("\t")
        if header != columns:
            raise ReleaseError(f"{name}: the header is {header}, RF2 needs {columns}")
        try:
            return pl.read_csv(
                io.BytesIO(data),
                separator="\t",
                quote_char=None,
                has_header=True,
                schema=schema,
                encoding="utf8",
            )
        except Exception as exc:  # polars raises several kinds; one clear message
            raise ReleaseError(f"{name}: not readable as RF2 ({exc})") from None

    def _read(self, kind: str, columns: list[str], schema: dict[str, Any]) -> pl.DataFrame:
        frames = [self._frame(n, columns, schema) for n in self.names(kind)]
        if not frames:
            return pl.DataFrame(schema=schema)
        frame = pl.concat(frames)
        # a Snapshot has one row per id: keep the latest should a file hold more
        return frame.sort("effectiveTime").unique("id", keep="last", maintain_order=False)

    def concepts(self) -> pl.DataFrame:
        """``id, effectiveTime, active, moduleId`` of every concept."""
        schema = {
            "id": pl.Int64,
            "effectiveTime": pl.Utf8,
            "active": pl.Int8,
            "moduleId": pl.Int64,
            "definitionStatusId": pl.Int64,
        }
        return self._read("concept", CONCEPT_COLUMNS, schema)

    def descriptions(self) -> pl.DataFrame:
        schema = {
            "id": pl.Int64,
            "effectiveTime": pl.Utf8,
            "active": pl.Int8,
            "moduleId": pl.Int64,
            "conceptId": pl.Int64,
            "languageCode": pl.Utf8,
            "typeId": pl.Int64,
            "term": pl.Utf8,
            "caseSignificanceId": pl.Int64,
        }
        return self._read("description", DESCRIPTION_COLUMNS, schema)

    def relationships(self) -> pl.DataFrame:
        schema = {
            "id": pl.Int64,
            "effectiveTime": pl.Utf8,
            "active": pl.Int8,
            "moduleId": pl.Int64,
            "sourceId": pl.Int64,
            "destinationId": pl.Int64,
            "relationshipGroup": pl.Int64,
            "typeId": pl.Int64,
            "characteristicTypeId": pl.Int64,
            "modifierId": pl.Int64,
        }
        return self._read("relationship", RELATIONSHIP_COLUMNS, schema)

    def language(self) -> pl.DataFrame:
        schema = {
            "id": pl.Utf8,  # a UUID
            "effectiveTime": pl.Utf8,
            "active": pl.Int8,
            "moduleId": pl.Int64,
            "refsetId": pl.Int64,
            "referencedComponentId": pl.Int64,
            "acceptabilityId": pl.Int64,
        }
        return self._read("language", LANGUAGE_COLUMNS, schema)


def walk_json_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of every ``.json`` file in a folder or zip (ValueSet resources)."""
    if path.is_dir():
        for p in sorted(path.rglob("*.json")):
            yield str(p), p.read_bytes()
    elif path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for name in sorted(z.namelist()):
                if name.endswith(".json"):
                    yield name, z.read(name)
    elif path.is_file():
        yield str(path), path.read_bytes()


def is_rf2(path: Path) -> bool:
    """Whether ``path`` holds RF2 Snapshot files (a release) rather than only JSON."""
    if path.is_dir():
        return any(_kind(str(p)) for p in path.rglob("*.txt"))
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return any(_kind(n) for n in z.namelist())
    return False


__all__ = [
    "ACCEPTABLE",
    "CORE_MODULE",
    "DEFAULT_LANGUAGE_REFSETS",
    "FSN",
    "IS_A",
    "PREFERRED",
    "ROOT",
    "SYNONYM",
    "Release",
    "ReleaseError",
    "is_rf2",
    "walk_json_files",
]
