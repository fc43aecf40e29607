"""The ledger's named Alembic migrations, shipped with the package.

``milliwatt.ledger`` runs them when it opens a ledger; nothing here is imported by
``import milliwatt``. See docs/ledger.md, "Migrations", for how to add one.
"""
