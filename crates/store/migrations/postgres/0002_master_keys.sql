-- Master keys, wrapped (RFC 3394) under the key-encryption key, which is never stored here.
-- Rows are only inserted: a new key is a new version, and old versions stay for old cards.
CREATE TABLE master_keys (
    kind        SMALLINT NOT NULL CHECK (kind BETWEEN 1 AND 5),
    version     SMALLINT NOT NULL CHECK (version BETWEEN 1 AND 255),
    algorithm   SMALLINT NOT NULL CHECK (algorithm IN (0, 4)),
    wrapped     BYTEA NOT NULL CHECK (length(wrapped) = 24),
    check_value BYTEA NOT NULL CHECK (length(check_value) = 4),
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (kind, version)
);

CREATE FUNCTION master_keys_insert_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'master keys are insert-only';
END $$;
CREATE TRIGGER master_keys_insert_only BEFORE UPDATE OR DELETE ON master_keys
    FOR EACH ROW EXECUTE FUNCTION master_keys_insert_only();
CREATE TRIGGER master_keys_insert_only_truncate BEFORE TRUNCATE ON master_keys
    FOR EACH STATEMENT EXECUTE FUNCTION master_keys_insert_only();
