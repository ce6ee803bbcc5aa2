"""Terminologies from the site's own releases: SNOMED CT (RF2) with its is-a hierarchy and
descriptions, FHIR ValueSets, the Expression Constraint Language (ECL) over SNOMED CT, and
concept search.

The package sits between the domain packages and ``infra`` (``pyproject.toml``'s import-linter
layers): feasibility expands ECL and ValueSet code entries into explicit code sets through it
when a question is compiled, so the engines and the stream only ever see explicit codes.

* :mod:`.rf2`: reading an RF2 release (folder or zip, as NHS TRUD distributes it);
* :mod:`.hierarchy`: the active is-a hierarchy in compact arrays, closures in numpy;
* :mod:`.ecl`: the ECL parser (errors carry the character position) and its evaluation;
* :mod:`.valuesets`: FHIR ValueSet resources, their ``expansion`` or ``compose``;
* :mod:`.store`: the local SQLite store (releases, concepts, descriptions, search, ValueSets).
"""
