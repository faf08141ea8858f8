"""Search filters over what the catalog records of each file (`FileMeta`): `--where` clauses.

    modality=ES,XA; date>=2020-01-01; date<2021-01-01; body=LARYNX; tag=clinic-a

Clauses are separated by `;` and all must hold; `FIELD=A,B` holds when the field is any of the
values. Fields: modality (DICOM Modality), body (BodyPartExamined), date (StudyDate; also takes
<, <=, >, >=, as YYYY-MM-DD or YYYYMMDD), tag, patient (PatientID), study (StudyInstanceUID) and
series (SeriesInstanceUID). Modality and body compare case-insensitively (DICOM writes them in
capitals), the others exactly. A file whose field is unknown (a plain image file has no modality)
matches no clause on that field. An image matches when one of its files matches every clause.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

import sqlalchemy as sa

from generation.errors import InputError

FIELDS = {"modality": "modality", "date": "study_date", "body": "body_part", "tag": "tag",
          "patient": "patient_id", "study": "study_uid", "series": "series_uid"}  # fmt: skip
CAPITALISED = ("modality", "body")
ORDERINGS = ("<", "<=", ">", ">=")
_CLAUSE = re.compile(r"^\s*([A-Za-z_]+)\s*(<=|>=|<|>|=)\s*(.*?)\s*$")


@dataclass(frozen=True)
class Clause:
    field: str  # a key of FIELDS
    op: str  # '=' or, for date, one of ORDERINGS
    values: tuple[str, ...]  # as the catalog stores them (dates YYYYMMDD)


@dataclass(frozen=True)
class SearchFilter:
    clauses: tuple[Clause, ...]
    text: str  # as written

    @classmethod
    def parse(cls, text: str) -> SearchFilter:
        """'modality=ES,XA; date>=2020-01-01' -> a filter; a bad clause is a one-line InputError."""
        clauses = tuple(_clause(part) for part in text.split(";") if part.strip())
        if not clauses:
            raise InputError(f"--where {text!r}: no clause; write e.g. \"modality=ES; date>=2020-01-01; tag=clinic-a\"")
        return cls(clauses, text)

    def condition(self, columns) -> sa.ColumnElement[bool]:
        """The SQL condition on the files table's columns (`files_table.c`)."""
        conditions = []
        for clause in self.clauses:
            column = columns[FIELDS[clause.field]]
            if clause.field in CAPITALISED:
                column = sa.func.upper(column)
            if clause.op == "=":
                conditions.append(column.in_(clause.values))
            else:
                conditions.append(sa.and_(column.is_not(None), column.op(clause.op)(clause.values[0])))
        return sa.and_(*conditions)


def _clause(text: str) -> Clause:
    found = _CLAUSE.match(text)
    if found is None:
        raise InputError(f"--where clause {text.strip()!r}: expected FIELD=VALUE[,VALUE...] or date>=YYYY-MM-DD")
    name, op, value = found.group(1).lower(), found.group(2), found.group(3)
    if name not in FIELDS:
        raise InputError(f"--where clause {text.strip()!r}: unknown field {name!r}; use one of {', '.join(FIELDS)}")
    if op != "=" and name != "date":
        raise InputError(f"--where clause {text.strip()!r}: only date takes {', '.join(ORDERINGS)}; write {name}=VALUE")
    values = tuple(v.strip() for v in value.split(","))
    if not all(values):
        raise InputError(f"--where clause {text.strip()!r}: a value is missing; write {name}=VALUE[,VALUE...]")
    if op != "=" and len(values) > 1:
        raise InputError(f"--where clause {text.strip()!r}: {op} takes one date")
    if name == "date":
        values = tuple(_dicom_date(text, v) for v in values)
    elif name in CAPITALISED:
        values = tuple(v.upper() for v in values)
    return Clause(name, op, values)


def _dicom_date(clause: str, value: str) -> str:
    """'2020-01-31' or '20200131' -> '20200131' (DICOM's StudyDate form, which sorts as text)."""
    digits = value.replace("-", "") if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value) else value
    try:
        if not re.fullmatch(r"\d{8}", digits):
            raise ValueError
        date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        raise InputError(f"--where clause {clause.strip()!r}: {value!r} is not a date; write YYYY-MM-DD") from None
    return digits
