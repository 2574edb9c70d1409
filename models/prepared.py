"""Reads that run on every request, with their SQL rendered once.

Peewee renders a query's SQL text afresh each time it runs: for the 31 columns of an account
that costs about 0.6 ms of CPU, against 0.02 ms for the database to answer, and its row
wrapper adds 0.1 ms more. The hot reads (an account by organization, a membership) are
therefore rendered once per kind of database and turned back into models by a converter list
worked out once, exactly as Peewee's own cursor wrapper does it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import peewee

from models.db import database, is_postgres

ModelT = TypeVar("ModelT", bound=peewee.Model)


class PreparedSelect(Generic[ModelT]):
    """`model`'s rows where `condition()` holds, rendered once per kind of database.

    `condition` builds the WHERE expression with placeholder values; each call passes the real
    values in the order the expression names them. `for_update` locks the row on PostgreSQL
    (SQLite's writer lock, taken by `write_transaction`, covers it there).
    """

    def __init__(
        self,
        model: type[ModelT],
        condition: Callable[[], peewee.Expression],
        *,
        for_update: bool = False,
    ) -> None:
        self.model = model
        self.condition = condition
        self.for_update = for_update
        self.fields: Sequence[peewee.Field] = model._meta.sorted_fields
        self._sql: dict[bool, str] = {}

    def sql(self) -> str:
        postgres = is_postgres()
        sql = self._sql.get(postgres)
        if sql is None:
            query = self.model.select(*self.fields).where(self.condition())
            if self.for_update and postgres:
                query = query.for_update()
            sql = self._sql[postgres] = str(query.sql()[0])
        return sql

    def first(self, *params: Any) -> ModelT | None:
        row = database.execute_sql(self.sql(), params).fetchone()
        if row is None:
            return None
        values = {
            field.name: None if value is None else field.python_value(value)
            for field, value in zip(self.fields, row, strict=True)
        }
        # As Peewee's ModelObjectCursorWrapper builds a loaded row: no defaults, nothing dirty.
        instance = self.model(__no_default__=1, **values)
        instance._dirty.clear()  # type: ignore[attr-defined]
        return instance
