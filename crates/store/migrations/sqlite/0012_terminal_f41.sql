-- Messages name a terminal by the last 8 digits of its number (field 41): unique, and the
-- index the front end's lookup by F41 uses.
CREATE UNIQUE INDEX terminals_f41 ON terminals (substr(terminal_no, 5));
