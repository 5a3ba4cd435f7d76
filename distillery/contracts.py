"""Data contracts: the YAML files in ``data_contracts/`` (ODCS-style) checked against real rows.

A contract lists a table's properties with their logical type, whether they are required or
unique, and length bounds. Rows are checked one by one at ingest (a failing row is quarantined
with the reason), and whole tables are checked at publish (a failing table stops the publish,
because that is a bug in the pipeline, not bad input).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import polars as pl
import yaml

CONTRACTS_DIR = Path(__file__).resolve().parent.parent / "data_contracts"

_PY_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
}
_POLARS_TYPES: dict[str, tuple[type[pl.DataType], ...]] = {
    "string": (pl.Utf8,),
    "integer": (pl.Int64, pl.Int8, pl.Int16, pl.Int32, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64),
    "number": (pl.Float64, pl.Float32, pl.Int32, pl.Int64),
    "boolean": (pl.Boolean,),
    "array": (pl.List,),
}


class ContractViolation(ValueError):
    """A table does not meet its contract; the message names the contract and the property."""


@dataclass(frozen=True)
class Property:
    name: str
    logical_type: str
    required: bool
    unique: bool
    min_length: int | None
    max_length: int | None


@dataclass(frozen=True)
class Contract:
    name: str
    version: str
    properties: tuple[Property, ...]

    def row_violations(self, row: dict[str, Any]) -> list[tuple[str, str]]:
        """``(reason, detail)`` for each way one row breaks the contract; empty if it is fine."""
        problems: list[tuple[str, str]] = []
        for prop in self.properties:
            value = row.get(prop.name)
            if value is None or (isinstance(value, str) and not value.strip() and prop.required):
                if prop.required:
                    problems.append(("missing_field", f"field '{prop.name}' is required"))
                continue
            allowed = _PY_TYPES[prop.logical_type]
            if not isinstance(value, allowed) or isinstance(value, bool) and bool not in allowed:
                problems.append(
                    ("wrong_type", f"field '{prop.name}': expected {prop.logical_type}, got {type(value).__name__}")
                )
                continue
            if isinstance(value, str):
                if prop.max_length is not None and len(value) > prop.max_length:
                    problems.append(
                        ("too_long", f"field '{prop.name}': {len(value)} characters, at most {prop.max_length}")
                    )
                if prop.min_length is not None and len(value.strip()) < prop.min_length:
                    problems.append(
                        ("too_short", f"field '{prop.name}': {len(value.strip())} characters, at least {prop.min_length}")
                    )
        return problems

    def empty_frame(self) -> pl.DataFrame:
        """A table with no rows and the contract's columns, e.g. for a version that published nothing."""
        return pl.DataFrame(schema={p.name: _POLARS_TYPES[p.logical_type][0] for p in self.properties})

    def check_table(self, table: pl.DataFrame) -> None:
        """Raise :class:`ContractViolation` naming the first property the table breaks."""
        for prop in self.properties:
            where = f"contract {self.name} {self.version}: property '{prop.name}'"
            if prop.name not in table.columns:
                if prop.required:
                    raise ContractViolation(f"{where} is missing from the table")
                continue
            column = table[prop.name]
            if column.dtype != pl.Null and not isinstance(column.dtype, _POLARS_TYPES[prop.logical_type]):
                raise ContractViolation(f"{where} has type {column.dtype}, expected {prop.logical_type}")
            if prop.required and column.null_count():
                raise ContractViolation(f"{where} is required but has {column.null_count()} nulls")
            if prop.unique and column.n_unique() != table.height:
                raise ContractViolation(f"{where} must be unique but has {table.height - column.n_unique()} repeats")
            if prop.max_length is not None and prop.logical_type == "string":
                longest = column.str.len_chars().max()
                if longest is not None and longest > prop.max_length:
                    raise ContractViolation(f"{where} has a value of {longest} characters, at most {prop.max_length}")


@cache
def load_contract(name: str) -> Contract:
    """Load ``data_contracts/<name>.odcs.yaml``."""
    path = CONTRACTS_DIR / f"{name}.odcs.yaml"
    doc = yaml.safe_load(path.read_text())
    (table,) = doc["schema"]
    properties = []
    for p in table["properties"]:
        options = p.get("logicalTypeOptions", {})
        if p["logicalType"] not in _PY_TYPES:
            msg = f"{path}: property '{p['name']}' has unknown logicalType {p['logicalType']!r}"
            raise ValueError(msg)
        properties.append(
            Property(
                name=p["name"],
                logical_type=p["logicalType"],
                required=bool(p.get("required", False)),
                unique=bool(p.get("unique", False)),
                min_length=options.get("minLength"),
                max_length=options.get("maxLength"),
            )
        )
    return Contract(name=doc["name"], version=str(doc["version"]), properties=tuple(properties))
