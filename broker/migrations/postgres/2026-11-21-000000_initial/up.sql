-- Instances, bindings and operations of the OSB API (PostgreSQL). Times are Unix milliseconds.
CREATE TABLE instances (
    id TEXT PRIMARY KEY NOT NULL,
    service_id TEXT NOT NULL,
    plan_id TEXT NOT NULL,
    state TEXT NOT NULL,
    parameters TEXT NOT NULL,
    context TEXT NOT NULL,
    organization_guid TEXT,
    space_guid TEXT,
    maintenance_version TEXT,
    engine TEXT NOT NULL,
    engine_version TEXT NOT NULL,
    settings TEXT NOT NULL,
    port INTEGER UNIQUE,
    host TEXT,
    database_name TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE bindings (
    id TEXT PRIMARY KEY NOT NULL,
    instance_id TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    service_id TEXT NOT NULL,
    plan_id TEXT NOT NULL,
    state TEXT NOT NULL,
    parameters TEXT NOT NULL,
    bind_resource TEXT NOT NULL,
    context TEXT NOT NULL,
    predecessor_binding_id TEXT,
    username TEXT,
    password_sealed BYTEA,
    host TEXT,
    port INTEGER,
    database_name TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX bindings_instance ON bindings (instance_id);

CREATE TABLE operations (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    instance_id TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    binding_id TEXT,
    state TEXT NOT NULL,
    description TEXT,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    run_after BIGINT NOT NULL,
    lease_owner TEXT,
    lease_until BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE INDEX operations_instance ON operations (instance_id, seq);
CREATE INDEX operations_due ON operations (state, run_after);
-- At most one running operation on an instance itself, and one per binding: the
-- database, not the handlers' checks, is what makes a second mutation a ConcurrencyError.
CREATE UNIQUE INDEX operations_one_per_instance ON operations (instance_id)
    WHERE state = 'in progress' AND binding_id IS NULL;
CREATE UNIQUE INDEX operations_one_per_binding ON operations (binding_id)
    WHERE state = 'in progress' AND binding_id IS NOT NULL;
