DROP TABLE backup_tokens;
DROP TABLE backup_policies;
DROP TABLE restores;
DROP TABLE backups;
ALTER TABLE instances DROP COLUMN backup_key_sealed;
