"""The metadata database on SQLite and on a real PostgreSQL server: migrations, keys, ownership, usage."""

import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, text

from actors.metadata.database import Database
from actors.metadata.registry import Registry
from actors.metadata.tables import ApiKey, Base, Checkpoint
from actors.metadata.tenants import Tenants
from actors.work import ANONYMOUS, LoraSpec
from configs.errors import AuthenticationError, NotFoundError, UserError


@pytest.fixture
def db(database_url):
    database = Database(database_url)
    database.migrate()
    yield database
    database.close()


def test_migrations_build_exactly_the_declared_schema(db):
    with db.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []


def test_migrating_again_or_from_many_threads_at_once_is_harmless(database_url):
    databases = [Database(database_url) for _ in range(3)]
    errors = []

    def migrate(database):
        try:
            database.migrate()
        except Exception as exc:  # collected: the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(d,)) for d in databases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    databases[0].migrate()
    assert errors == []
    with databases[0].engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0011"


def test_open_mode_gives_each_key_its_own_tenant(db):
    tenants = Tenants(db, "open")
    alice, bob = tenants.authenticate("tml-alice"), tenants.authenticate("tml-bob")
    assert alice != bob and alice == tenants.authenticate("tml-alice")
    assert tenants.authenticate(None) == ANONYMOUS
    record, key = tenants.create_key("team-a")
    assert tenants.authenticate(key) == "team-a"
    tenants.revoke(record.id)
    with pytest.raises(AuthenticationError, match="revoked"):
        tenants.authenticate(key)


def test_keys_mode_accepts_issued_keys_only_and_a_revoked_key_stops_at_once(db):
    tenants = Tenants(db, "keys")
    for key in (None, "tml-made-up", ""):
        with pytest.raises(AuthenticationError):
            tenants.authenticate(key)
    record, key = tenants.create_key("team-a", name="ci")
    assert key.startswith("tml-") and tenants.authenticate(key) == "team-a"
    assert [(k.tenant_id, k.name, k.revoked_at) for k in tenants.list_keys()] == [("team-a", "ci", None)]
    tenants.revoke(record.id)
    with pytest.raises(AuthenticationError, match="revoked"):
        tenants.authenticate(key)
    with pytest.raises(NotFoundError):
        tenants.revoke(10_000)
    with pytest.raises(UserError):
        tenants.create_key("../escape")


def test_the_key_table_holds_no_clear_text_key(db):
    tenants = Tenants(db, "open")
    _, issued = tenants.create_key("team-a")
    tenants.authenticate("tml-open-mode-key")
    with db.engine.connect() as connection:
        rows = connection.execute(select(ApiKey.__table__)).all()
    dumped = " ".join(str(value) for row in rows for value in row)
    assert len(rows) == 2 and issued not in dumped and "tml-open-mode-key" not in dumped
    assert issued[4:] not in dumped  # not even the random part


def test_other_tenants_rows_look_exactly_like_missing_ones(db):
    registry, tenants = Registry(db), Tenants(db, "open")
    alice, bob = tenants.authenticate("tml-alice"), tenants.authenticate("tml-bob")
    session_id = registry.create_session(alice, "0.38.0", ["x"], {"k": "v"})
    run_id = f"{session_id}:train:0"
    assert registry.add_run(alice, run_id, session_id, "base", LoraSpec(rank=4), {}) is True
    assert registry.add_run(alice, run_id, session_id, "base", LoraSpec(rank=4), {}) is False  # a retry
    registry.add_sampler(alice, f"{session_id}:sample:0", session_id, "base", None)
    registry.add_checkpoint(
        alice, Checkpoint(training_run_id=run_id, segment="weights", name="a", base_model="base", size_bytes=10)
    )
    sampler_id = f"{session_id}:sample:0"
    lookups = [
        (lambda t, i: registry.session(t, i), session_id),
        (lambda t, i: registry.run(t, i), run_id),
        (lambda t, i: registry.sampler(t, i), sampler_id),
        (lambda t, i: registry.checkpoint(t, i, "weights", "a"), run_id),
    ]
    for lookup, owned_id in lookups:
        lookup(alice, owned_id)
        with pytest.raises(NotFoundError) as foreign:
            lookup(bob, owned_id)
        with pytest.raises(NotFoundError) as absent:
            lookup(bob, "nope")
        assert str(foreign.value).replace(owned_id, "X") == str(absent.value).replace("nope", "X")
    with pytest.raises(UserError, match="taken"):
        registry.add_run(bob, run_id, None, "base", LoraSpec(rank=4), {})
    assert registry.runs(bob) == ([], 0) and registry.checkpoints(bob) == ([], 0)
    assert [r.id for r in registry.runs(alice)[0]] == [run_id]
    assert registry.live_runs(alice, session_id) == [run_id] and registry.live_runs(bob) == []
    with pytest.raises(NotFoundError):
        registry.delete_checkpoint(bob, run_id, "weights", "a")
    registry.delete_checkpoint(alice, run_id, "weights", "a")
    assert registry.checkpoints(alice) == ([], 0)


def test_sessions_without_signs_of_life_expire_once_oldest_first_and_are_released_once(db):
    from datetime import timedelta

    from actors.metadata.tables import utc_now
    from configs.errors import SessionFinishedError

    registry, tenants = Registry(db), Tenants(db, "open")
    alice, bob = tenants.authenticate("tml-alice"), tenants.authenticate("tml-bob")
    quiet, beating, done = (registry.create_session(alice, "0.38.0", [], {}) for _ in range(3))
    assert registry.session(alice, quiet).last_seen_at is not None  # its start is its first sign of life
    registry.finish_session(alice, done, "success")
    with pytest.raises(NotFoundError):
        registry.touch_session(bob, beating)  # another tenant's: as unknown
    with pytest.raises(SessionFinishedError, match="finished by its client"):
        registry.open_session(alice, done)  # no new models in a finished session (410)
    cutoff = utc_now() + timedelta(milliseconds=50)  # all three started before it
    while utc_now() <= cutoff:
        pass
    assert registry.touch_session(alice, beating).last_seen_at > cutoff
    assert registry.touch_session(alice, done).finished_at is not None  # a finished one is not revived
    assert registry.expire_idle_sessions(cutoff) == 1  # the quiet one only
    assert registry.expire_idle_sessions(cutoff) == 0  # claimed once
    row = registry.session(alice, quiet)
    assert row.finish_reason == "expired" and row.finished_at is not None
    with pytest.raises(SessionFinishedError, match="expired"):
        registry.open_session(alice, quiet)
    assert registry.session(alice, done).finish_reason == "success"
    assert registry.sessions_to_release() == [(alice, quiet)]
    registry.mark_released(quiet)
    assert registry.sessions_to_release() == []


def test_the_expiry_takes_the_oldest_idle_sessions_first(db):
    from datetime import timedelta

    from actors.metadata.tables import utc_now

    registry, alice = Registry(db), Tenants(db, "open").authenticate("tml-alice")
    old = registry.create_session(alice, "0.38.0", [], {})
    newer = [registry.create_session(alice, "0.38.0", [], {}) for _ in range(5)]
    cutoff = utc_now() + timedelta(milliseconds=10)
    while utc_now() <= cutoff:
        pass
    assert registry.expire_idle_sessions(cutoff, batch=2, batches=1) == 2
    assert registry.session(alice, old).finish_reason == "expired"  # the oldest went first
    assert registry.expire_idle_sessions(cutoff, batch=2, batches=10) == 4  # batches go on while full
    assert all(registry.session(alice, s).finish_reason == "expired" for s in newer)


def test_a_save_under_the_same_name_replaces_the_record(db):
    registry, tenant = Registry(db), Tenants(db, "open").authenticate("tml-alice")
    for size in (10, 20):
        registry.add_checkpoint(
            tenant, Checkpoint(training_run_id="r", segment="weights", name="a", base_model="b", size_bytes=size)
        )
    rows, total = registry.checkpoints(tenant, "r")
    assert total == 1 and rows[0].size_bytes == 20 and rows[0].created_at.tzinfo is not None


def test_usage_accumulates_per_tenant(db):
    registry, tenants = Registry(db), Tenants(db, "open")
    alice, bob = tenants.authenticate("tml-alice"), tenants.authenticate("tml-bob")
    for amount in (100, 20, 3):
        registry.add_usage(alice, "s", "base", "tokens_trained", amount)
    registry.add_usage(alice, None, "base", "tokens_sampled", 7)
    registry.add_usage(bob, "s2", "base", "tokens_trained", 1)
    registry.add_checkpoint(
        alice, Checkpoint(training_run_id="r", segment="weights", name="a", base_model="b", size_bytes=4096)
    )
    assert registry.usage(alice) == {"tokens_trained": 123, "tokens_sampled": 7, "checkpoint_bytes": 4096}
    assert registry.usage(bob) == {"tokens_trained": 1, "tokens_sampled": 0, "checkpoint_bytes": 0}


def test_open_mode_beyond_loopback_logs_a_loud_warning(tmp_path, caplog):
    from configs.schema import ThinkerConfig
    from deployments.tenancy import Tenancy

    open_mode = Tenancy(ThinkerConfig(database_url=f"sqlite:///{tmp_path / 'a.sqlite3'}"))
    keys_mode = Tenancy(ThinkerConfig(database_url=f"sqlite:///{tmp_path / 'b.sqlite3'}", auth={"mode": "keys"}))
    for host in ("127.0.0.1", "localhost", "::1"):
        open_mode.warn_if_exposed(host)
    keys_mode.warn_if_exposed("0.0.0.0")
    assert "ANYONE" not in caplog.text
    open_mode.warn_if_exposed("0.0.0.0")
    assert "ANYONE who can reach this address" in caplog.text and "auth.mode: keys" in caplog.text
