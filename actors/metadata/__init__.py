"""The metadata database: tenants, API keys, sessions, training runs, samplers, checkpoints, usage.

tables.py (the schema), database.py (engine, migrations, transactions), tenants.py (keys and
authentication), registry.py (who owns what; the REST listings; usage). SQLite (WAL) under the
data root by default, PostgreSQL through a URL for multi-node deployments. Torch-free: the ingress
and the model actors both use it.
"""
