"""SQLAlchemy types that the layers above name in signatures, without importing SQLAlchemy."""

from __future__ import annotations

from sqlalchemy import Engine as Engine
from sqlalchemy import Row as Row
