-- streaming 0007: re-running a finished task as a new attempt of the same run.
-- Applied by streaming/migrations/0007_rerun.py. Append-only.

INSERT INTO streaming_schema_file (name) VALUES ('0007_rerun.sql');

-- Queue a finished run (completed, failed or cancelled) again. Its log is kept: the next
-- claim makes attempt n+1, writes its `retry` event after the last seq, and the new
-- attempt appends after that, so the seqs stay gap-free. The attempt budget starts afresh
-- (`releases` counts the attempts that do not count against max_attempts).
--
-- Every `end` in the log means what it always meant: the task finished there, and whoever
-- has seen it finds the task finished. So the `end` events written so far are renamed
-- `previous_end` (their data and seqs unchanged): a stream replaying the log passes through
-- them to the re-run's events and closes at the re-run's own `end`.
-- Returns the run's id and last seq; no row when the task is not finished (or never ran).
CREATE FUNCTION streaming_rerun(p_app_label text, p_model_name text, p_task_id bigint)
RETURNS TABLE (id bigint, last_seq bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    r streaming_taskrun%ROWTYPE;
BEGIN
    UPDATE streaming_taskrun t
       SET status = 'pending', releases = t.attempt, final_value = NULL, error = NULL,
           cancel_requested_at = NULL, finished_at = NULL, lease_owner = NULL,
           lease_expires_at = NULL, queued_at = now(), updated_at = now()
     WHERE t.app_label = p_app_label AND t.model_name = p_model_name
       AND t.task_id = p_task_id AND t.status IN ('completed', 'failed', 'cancelled')
    RETURNING * INTO r;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE streaming_taskevent e
       SET event_type = 'previous_end'
     WHERE e.app_label = p_app_label AND e.model_name = p_model_name
       AND e.task_id = p_task_id AND e.event_type = 'end';
    RETURN QUERY SELECT r.id, r.last_seq;
END $$;
