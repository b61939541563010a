-- Messages name a terminal by the last 8 digits of its number (field 41): the index the front
-- end's lookup by F41 uses. (Registration refuses a second terminal with the same 8 digits; the
-- index is not unique so that a database holding such a pair from before that check still
-- migrates.)
CREATE INDEX terminals_f41 ON terminals (substr(terminal_no, 5));

-- Cards, stock and terminals made before key versions were recorded (migration 0011) were made
-- under the versions in force then: the newest at the time of this migration, unless keys were
-- rotated in between (nothing recorded it). Recording them now keeps them working after the
-- next rotation.
UPDATE card_stock SET key_version = (SELECT MAX(version) FROM master_keys WHERE kind = 3)
    WHERE key_version IS NULL AND state <> 0;
UPDATE cards SET key_version = (SELECT MAX(version) FROM master_keys WHERE kind = 3)
    WHERE key_version IS NULL;
UPDATE terminals SET tmk_version = (SELECT MAX(version) FROM master_keys WHERE kind = 4)
    WHERE tmk_version IS NULL;
