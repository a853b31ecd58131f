-- Backups, restores, backup policies and instance-scoped API tokens (postgres). Times are
-- Unix milliseconds. Backups and restores name their instance without a foreign key:
-- a backup outlives its instance (a clone may still use it), and the instance row stays
-- (state 'deleted') anyway.
ALTER TABLE instances ADD COLUMN backup_key_sealed BYTEA;

CREATE TABLE backups (
    id TEXT PRIMARY KEY NOT NULL,
    instance_id TEXT NOT NULL,
    operation_id TEXT,
    triggered_by TEXT NOT NULL,
    state TEXT NOT NULL,
    strategy TEXT,
    engine TEXT,
    engine_version TEXT,
    format TEXT,
    raw_bytes BIGINT,
    stored_bytes BIGINT,
    sha256 TEXT,
    progress_raw_bytes BIGINT,
    progress_stored_bytes BIGINT,
    error TEXT,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT
);
CREATE INDEX backups_instance ON backups (instance_id, created_at);
-- An operation finds its backup, or its restore, by operation_id.
CREATE INDEX backups_operation ON backups (operation_id);

CREATE TABLE restores (
    id TEXT PRIMARY KEY NOT NULL,
    instance_id TEXT NOT NULL,
    backup_id TEXT NOT NULL,
    source_instance_id TEXT NOT NULL,
    operation_id TEXT NOT NULL,
    state TEXT NOT NULL,
    phase TEXT,
    progress_raw_bytes BIGINT,
    progress_stored_bytes BIGINT,
    error TEXT,
    created_at BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE INDEX restores_instance ON restores (instance_id, created_at);
CREATE INDEX restores_operation ON restores (operation_id);

-- The schedule and retention of an instance; next_run_at is when the scheduler next
-- starts a backup (NULL: no schedule). It survives the instance, for the retention of
-- the backups a deleted instance left.
CREATE TABLE backup_policies (
    instance_id TEXT PRIMARY KEY NOT NULL,
    schedule TEXT,
    keep_last INTEGER,
    max_age_days INTEGER,
    next_run_at BIGINT,
    updated_at BIGINT NOT NULL
);

-- Tokens of service keys created with backup_access: only their SHA-256 is kept.
CREATE TABLE backup_tokens (
    token_sha256 TEXT PRIMARY KEY NOT NULL,
    instance_id TEXT NOT NULL,
    binding_id TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);
