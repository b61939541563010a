-- Which master-key version made a card's keys and a terminal's TMK, so that rotating a master
-- key leaves the cards and terminals made before it working: a card's TAC is checked with the
-- version it was initialised under, a terminal signs in under the TMK it was installed with.
-- NULL: made before this was recorded (the newest version is used).
ALTER TABLE card_stock ADD COLUMN key_version INTEGER;
ALTER TABLE cards ADD COLUMN key_version INTEGER;
ALTER TABLE terminals ADD COLUMN tmk_version INTEGER;
