-- Master keys, wrapped (RFC 3394) under the key-encryption key, which is never stored here.
-- Rows are only inserted: a new key is a new version, and old versions stay for old cards.
CREATE TABLE master_keys (
    kind        INTEGER NOT NULL CHECK (kind BETWEEN 1 AND 5),
    version     INTEGER NOT NULL CHECK (version BETWEEN 1 AND 255),
    algorithm   INTEGER NOT NULL CHECK (algorithm IN (0, 4)),
    wrapped     BLOB NOT NULL CHECK (length(wrapped) = 24),
    check_value BLOB NOT NULL CHECK (length(check_value) = 4),
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (kind, version)
) STRICT;

CREATE TRIGGER master_keys_insert_only_update BEFORE UPDATE ON master_keys
BEGIN SELECT RAISE(ABORT, 'master keys are insert-only'); END;
CREATE TRIGGER master_keys_insert_only_delete BEFORE DELETE ON master_keys
BEGIN SELECT RAISE(ABORT, 'master keys are insert-only'); END;
