"""Multipart endpoints whose form fields and file are one documented request body."""
from __future__ import annotations

import flask_smorest
from webargs.flaskparser import FlaskParser
from werkzeug.datastructures import CombinedMultiDict


class MultipartParser(FlaskParser):
    """webargs parser with a `form_and_files` location: the fields and files of one multipart body."""

    def load_form_and_files(self, req, schema):
        return self._makeproxy(CombinedMultiDict([req.files, req.form]), schema)


MultipartParser.__location_map__ = {**FlaskParser.__location_map__, "form_and_files": "load_form_and_files"}


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = MultipartParser()
    DEFAULT_LOCATION_CONTENT_TYPE_MAPPING = {
        **flask_smorest.Blueprint.DEFAULT_LOCATION_CONTENT_TYPE_MAPPING, "form_and_files": "multipart/form-data"}
