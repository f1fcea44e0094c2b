"""Paginated listings: one query schema, one page envelope, one way to count and slice."""
from __future__ import annotations

import marshmallow as ma
from sqlalchemy import func, select

from common.extensions import db


class PageQuerySchema(ma.Schema):
    page = ma.fields.Integer(load_default=1, validate=ma.validate.Range(min=1, max=100_000))
    per_page = ma.fields.Integer(load_default=20, validate=ma.validate.Range(min=1, max=100))


def page_schema(item_schema: type[ma.Schema]) -> type[ma.Schema]:
    """The envelope `{items, page, per_page, total}` around `item_schema`, named after it in the spec."""
    name = item_schema.__name__.replace("Schema", "PageSchema")
    return ma.Schema.from_dict({
        "items": ma.fields.List(ma.fields.Nested(item_schema)), "page": ma.fields.Integer(),
        "per_page": ma.fields.Integer(), "total": ma.fields.Integer()}, name=name)


def paginate(model: type, filters: list, order_by: list, query: dict) -> dict:
    """One page of `model` rows matching `filters`, with the total count."""
    total = db.session.scalar(select(func.count()).select_from(model).where(*filters))
    items = db.session.scalars(select(model).where(*filters).order_by(*order_by)
                               .offset((query["page"] - 1) * query["per_page"]).limit(query["per_page"])).all()
    return {"items": items, "page": query["page"], "per_page": query["per_page"], "total": total}
