"""The catalogue: SQLAlchemy models, engine, repository and Alembic migrations."""
