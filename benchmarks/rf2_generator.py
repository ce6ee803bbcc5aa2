"""A generated SNOMED CT release in RF2 (Snapshot files, real column layout), of any size.

The project ships no SNOMED content, so the load and search benchmarks run on a made-up release
shaped like the UK Clinical Edition: about 370,000 concepts (some inactive), 19 top-level
hierarchies under the root, a depth of up to 14, about 1.7 active parents per concept (a
concept's extra parents lie near its first, as in SNOMED CT, where a concept with two parents
has parents of the same kind), inactive is-a rows left from earlier releases and attribute
rows (to 1.3M is-a rows and more relationship rows in all), an FSN and one to three synonyms
per concept from a vocabulary of made-up words, and a GB English language reference set
marking each concept's preferred synonym.

    python -m benchmarks.rf2_generator var/rf2-uk --concepts 370000 --is-a-rows 1300000
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from pathlib import Path

ROOT = 138875005
IS_A = 116680003
FSN = 900000000000003001
SYNONYM = 900000000000013009
GB = 900000000000508004
PREFERRED = 900000000000548007
ACCEPTABLE = 900000000000549004
CORE = 900000000000207008
UK = 999000011000000103
TAGS = [
    "disorder",
    "finding",
    "procedure",
    "body structure",
    "substance",
    "product",
    "organism",
    "observable entity",
    "qualifier value",
    "situation",
    "event",
    "physical object",
    "specimen",
    "regime/therapy",
    "morphologic abnormality",
    "clinical drug",
    "medicinal product",
    "cell",
    "environment",
]
#: concepts per depth (relative): SNOMED CT is widest some eight levels down
LEVELS = [
    1,
    19,
    300,
    2500,
    9000,
    20000,
    35000,
    48000,
    55000,
    55000,
    48000,
    38000,
    28000,
    17000,
    10000,
]


def _sctid(n: int, partition: str = "00") -> int:
    """An id of SNOMED CT's shape (a sequence, a partition id and a check digit; the check
    digit here is not Verhoeff's)."""
    return int(f"{n}{partition}{n % 7}")


def _vocabulary(rng: random.Random, size: int) -> list[str]:
    syllables = [
        "ab",
        "ac",
        "al",
        "an",
        "ar",
        "bro",
        "car",
        "cor",
        "di",
        "en",
        "gas",
        "hep",
        "hy",
        "in",
        "ka",
        "lo",
        "ma",
        "neu",
        "os",
        "pa",
        "per",
        "pul",
        "re",
        "sco",
        "ter",
        "tro",
        "ul",
        "va",
        "ver",
        "xi",
        "zo",
        "mel",
        "ton",
        "lit",
        "ose",
        "itis",
        "oma",
        "ia",
        "al",
        "ic",
    ]
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def generate(out: Path, concepts: int, is_a_rows: int, seed: int = 7) -> dict[str, float]:
    rng = random.Random(seed)
    vocabulary = _vocabulary(rng, 12000)
    common = vocabulary[:300]  # words many terms share ("disorder", "of", "structure" ...)
    date = "20250401"
    folder = out / f"SnomedCT_UKClinicalRF2_PRODUCTION_{date}T000001Z" / "Snapshot"
    (folder / "Terminology").mkdir(parents=True, exist_ok=True)
    (folder / "Refset" / "Language").mkdir(parents=True, exist_ok=True)

    total = sum(LEVELS)
    # about 8% of a release's concepts are inactive
    sizes = [max(1, round(0.92 * concepts * n / total)) for n in LEVELS]
    sizes[0], sizes[1] = 1, 19
    ids: list[list[int]] = []
    top: dict[int, int] = {}
    serial = 100000
    for size in sizes:
        level = []
        for _ in range(size):
            serial += 1
            level.append(_sctid(serial))
        ids.append(level)
    ids[0] = [ROOT]
    active_edges: list[tuple[int, int]] = []
    for depth in range(1, len(ids)):
        above = ids[depth - 1]
        for position, concept in enumerate(ids[depth]):
            # the first parent in proportion, so each level spreads over the one above
            first = min(len(above) - 1, position * len(above) // len(ids[depth]))
            parents = {above[first]}
            extra = rng.random()
            if depth > 1 and extra < 0.45:
                parents.add(above[max(0, min(len(above) - 1, first + rng.randint(-6, 6)))])
            if depth > 2 and extra < 0.08:
                higher = ids[depth - 2]
                near = first * len(higher) // len(above)
                parents.add(higher[max(0, min(len(higher) - 1, near + rng.randint(-3, 3)))])
            for parent in parents:
                active_edges.append((concept, parent))
            top[concept] = top.get(above[first], position % 19) if depth > 1 else position
    everyone = [c for level in ids for c in level]
    inactive = [_sctid(serial + n + 1) for n in range(max(0, concepts - len(everyone)))]

    started = time.perf_counter()
    with open(
        folder / "Terminology" / f"sct2_Concept_UKCLSnapshot_GB1000000_{date}.txt", "w", newline=""
    ) as f:
        f.write("id\teffectiveTime\tactive\tmoduleId\tdefinitionStatusId\r\n")
        for n, concept in enumerate(everyone):
            module = UK if n % 9 == 0 else CORE
            f.write(f"{concept}\t{date}\t1\t{module}\t900000000000074008\r\n")
        for concept in inactive:
            f.write(f"{concept}\t{date}\t0\t{CORE}\t900000000000074008\r\n")

    descriptions = 0
    language = 0
    with (
        open(
            folder / "Terminology" / f"sct2_Description_UKCLSnapshot-en_GB1000000_{date}.txt",
            "w",
            newline="",
        ) as d,
        open(
            folder
            / "Refset"
            / "Language"
            / f"der2_cRefset_LanguageUKCLSnapshot-en_GB1000000_{date}.txt",
            "w",
            newline="",
        ) as lr,
    ):
        d.write(
            "id\teffectiveTime\tactive\tmoduleId\tconceptId\tlanguageCode\ttypeId\tterm\t"
            "caseSignificanceId\r\n"
        )
        lr.write(
            "id\teffectiveTime\tactive\tmoduleId\trefsetId\treferencedComponentId\t"
            "acceptabilityId\r\n"
        )
        serial_d = 10_000_000
        for concept in [*everyone, *inactive]:
            words = [rng.choice(vocabulary) for _ in range(rng.randint(1, 3))]
            words.insert(rng.randint(0, len(words)), rng.choice(common))
            term = " ".join(words).capitalize()
            tag = TAGS[top.get(concept, 0) % len(TAGS)]
            serial_d += 1
            d.write(
                f"{_sctid(serial_d, '01')}\t{date}\t1\t{CORE}\t{concept}\ten\t{FSN}\t"
                f"{term} ({tag})\t900000000000448009\r\n"
            )
            descriptions += 1
            for k in range(rng.randint(1, 3)):
                synonym = (
                    term
                    if k == 0
                    else " ".join(
                        [*words[: rng.randint(1, len(words))], rng.choice(vocabulary)]
                    ).capitalize()
                )
                serial_d += 1
                did = _sctid(serial_d, "11")
                d.write(
                    f"{did}\t{date}\t1\t{CORE}\t{concept}\ten\t{SYNONYM}\t{synonym}\t"
                    "900000000000448009\r\n"
                )
                descriptions += 1
                lr.write(
                    f"{uuid.UUID(int=rng.getrandbits(128))}\t{date}\t1\t{CORE}\t{GB}\t{did}\t"
                    f"{PREFERRED if k == 0 else ACCEPTABLE}\r\n"
                )
                language += 1

    rows = 0
    with open(
        folder / "Terminology" / f"sct2_Relationship_UKCLSnapshot_GB1000000_{date}.txt",
        "w",
        newline="",
    ) as r:
        r.write(
            "id\teffectiveTime\tactive\tmoduleId\tsourceId\tdestinationId\t"
            "relationshipGroup\ttypeId\tcharacteristicTypeId\tmodifierId\r\n"
        )
        serial_r = 50_000_000

        def row(source: int, destination: int, active: int, type_id: int, group: int) -> None:
            nonlocal serial_r, rows
            serial_r += 1
            r.write(
                f"{_sctid(serial_r, '21')}\t{date}\t{active}\t{CORE}\t{source}\t{destination}"
                f"\t{group}\t{type_id}\t900000000000011006\t900000000000451002\r\n"
            )
            rows += 1

        for child, parent in active_edges:
            row(child, parent, 1, IS_A, 0)
        # is-a rows of earlier releases, now inactive
        for _ in range(max(0, is_a_rows - len(active_edges))):
            row(rng.choice(everyone), rng.choice(everyone), 0, IS_A, 0)
        # attribute rows (finding site and the like): read, not is-a
        for concept in everyone[::2]:
            row(concept, rng.choice(everyone), 1, 363698007, 1)
    return {
        "concepts": len(everyone) + len(inactive),
        "active_concepts": len(everyone),
        "active_is_a": len(active_edges),
        "is_a_rows": max(is_a_rows, len(active_edges)),
        "relationship_rows": rows,
        "descriptions": descriptions,
        "language_rows": language,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--concepts", type=int, default=370_000)
    parser.add_argument("--is-a-rows", type=int, default=1_300_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    print(generate(args.out, args.concepts, args.is_a_rows, args.seed), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
