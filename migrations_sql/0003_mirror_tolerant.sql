-- streaming 0003: the run-state mirror no longer fails when a task's table is gone.
-- Applied by streaming/migrations/0003_mirror_tolerant.py. Append-only.

INSERT INTO streaming_schema_file (name) VALUES ('0003_mirror_tolerant.sql');

-- A run whose model was removed (its table dropped or renamed) must still be able to fail:
-- otherwise finishing it raises, the run stays claimable, and being the oldest it would be
-- picked first by every claim, forever. The mirror is a convenience copy; the run row is
-- the truth, so a missing table is skipped.
CREATE OR REPLACE FUNCTION streaming_mirror_run() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        EXECUTE format(
            'UPDATE %I SET status = $1, attempt = $2, started_at = $3, completed_at = $4, '
            'final_value = $5, error = $6, updated_at = now() WHERE %I = $7',
            NEW.db_table, NEW.pk_column)
        USING NEW.status, NEW.attempt, NEW.started_at, NEW.finished_at, NEW.final_value,
              NEW.error, NEW.task_id;
    EXCEPTION WHEN undefined_table OR undefined_column THEN
        RAISE WARNING 'streaming: run % has no table %.% to mirror onto', NEW.id,
            NEW.db_table, NEW.pk_column;
    END;
    RETURN NULL;
END $$;
