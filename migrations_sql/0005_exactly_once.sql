-- streaming 0005: idempotent batch appends, idempotent finishes, claims that report the runs
-- they failed. Applied by streaming/migrations/0005_exactly_once.py. Append-only.

INSERT INTO streaming_schema_file (name) VALUES ('0005_exactly_once.sql');

-- One row per writer (an appender: one per process and event loop), with the result of its
-- last committed batch. A writer sends one batch at a time and numbers them 1, 2, 3…, so a
-- batch whose commit's acknowledgement was lost is retried before the next one: this row
-- then tells the retry that its batch was committed, and what it returned.
CREATE TABLE streaming_writer (
    writer     text        PRIMARY KEY,
    batch      bigint      NOT NULL,
    run_ids    bigint[]    NOT NULL,
    seqs       bigint[]    NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- streaming_append_batch, at most once per (writer, batch): a retried batch writes nothing
-- and returns the rows of its first commit. The advisory lock serialises a retry with a
-- first attempt that may still be running on a connection the writer gave up on.
CREATE FUNCTION streaming_append_batch_once(
    p_writer text, p_batch bigint,
    p_run_ids bigint[], p_attempts integer[], p_types text[], p_datas jsonb[])
RETURNS TABLE (ord integer, seq bigint, created_at timestamptz, data text, app_label text,
               model_name text, task_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    w streaming_writer%ROWTYPE;
    r record;
    out_seqs bigint[] := '{}';
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_writer, 0));
    SELECT * INTO w FROM streaming_writer WHERE writer = p_writer;
    IF FOUND AND w.batch >= p_batch THEN
        IF w.batch <> p_batch THEN
            RAISE EXCEPTION 'streaming: writer % retried batch % after batch %',
                p_writer, p_batch, w.batch;
        END IF;
        RETURN QUERY
        SELECT i.ord::integer, e.seq, e.created_at, e.data::text, e.app_label, e.model_name,
               e.task_id
          FROM unnest(w.run_ids, w.seqs) WITH ORDINALITY AS i(run_id, seq, ord)
          LEFT JOIN streaming_taskrun t ON t.id = i.run_id
          LEFT JOIN streaming_taskevent e
                 ON e.app_label = t.app_label AND e.model_name = t.model_name
                AND e.task_id = t.task_id AND e.seq = i.seq
         ORDER BY i.ord;
        RETURN;
    END IF;
    FOR r IN SELECT * FROM streaming_append_batch(p_run_ids, p_attempts, p_types, p_datas) LOOP
        ord := r.ord; seq := r.seq; created_at := r.created_at; data := r.data;
        app_label := r.app_label; model_name := r.model_name; task_id := r.task_id;
        out_seqs := out_seqs || r.seq;
        RETURN NEXT;
    END LOOP;
    INSERT INTO streaming_writer AS x (writer, batch, run_ids, seqs)
    VALUES (p_writer, p_batch, p_run_ids, out_seqs)
    ON CONFLICT (writer) DO UPDATE
       SET batch = excluded.batch, run_ids = excluded.run_ids, seqs = excluded.seqs,
           updated_at = now();
END $$;

-- A finish retried after its commit's acknowledgement was lost finds the run finished by the
-- same attempt: it returns the run's last seq (as the first call did) instead of NULL, so the
-- worker does not take its own success for a lost lease. Nothing is written twice.
CREATE OR REPLACE FUNCTION streaming_finish(
    p_run_id bigint, p_attempt integer, p_status text, p_final_value jsonb, p_error jsonb)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    s bigint;
    end_data jsonb;
    done streaming_taskrun%ROWTYPE;
BEGIN
    IF p_status = 'failed' AND p_error IS NOT NULL THEN
        s := streaming_append(p_run_id, p_attempt, 'error', p_error);
    ELSIF p_status = 'cancelled' THEN
        s := streaming_append(p_run_id, p_attempt, 'cancelled',
                              coalesce(p_error, '{"message": "cancelled"}'::jsonb));
    ELSE
        s := 0;
    END IF;
    IF s IS NOT NULL THEN
        end_data := jsonb_build_object('status', p_status, 'final_value', p_final_value);
        IF p_error IS NOT NULL THEN
            end_data := end_data || jsonb_build_object('error', p_error);
        END IF;
        s := streaming_append(p_run_id, p_attempt, 'end', end_data);
    END IF;
    IF s IS NULL THEN
        SELECT * INTO done FROM streaming_taskrun WHERE id = p_run_id;
        IF done.attempt = p_attempt AND done.status = p_status AND done.finished_at IS NOT NULL
        THEN
            RETURN done.last_seq;
        END IF;
        RETURN NULL;
    END IF;
    UPDATE streaming_taskrun
       SET status = p_status, final_value = p_final_value, error = p_error,
           finished_at = now(), updated_at = now(), lease_owner = NULL, lease_expires_at = NULL
     WHERE id = p_run_id;
    RETURN s;
END $$;

-- Claim the oldest claimable run, as before, and also report each run it failed on the way
-- (attempts used up: error and end written), so that the caller announces those events at
-- once instead of leaving them to the next poll. One row per run: claimed, or failed.
DROP FUNCTION streaming_claim(text, double precision, bigint);
CREATE FUNCTION streaming_claim(p_owner text, p_ttl double precision, p_run_id bigint)
RETURNS TABLE (claimed boolean, id bigint, app_label text, model_name text, task_id bigint,
               attempt integer, timeout_seconds double precision, last_seq bigint,
               cancel_requested boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    r streaming_taskrun%ROWTYPE;
    s bigint;
BEGIN
    LOOP
        SELECT * INTO r FROM streaming_taskrun t
         WHERE (t.status = 'pending' OR (t.status = 'running' AND t.lease_expires_at < now()))
           AND (p_run_id IS NULL OR t.id = p_run_id)
         ORDER BY t.queued_at, t.id
         LIMIT 1
         FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        IF r.attempt - r.releases >= r.max_attempts THEN
            s := streaming_finish_unowned(r.id, 'failed', NULL, jsonb_build_object(
                'message', format('lease expired on attempt %s of %s', r.attempt, r.max_attempts),
                'error_type', 'LeaseExpired'));
            RETURN QUERY SELECT false, r.id, r.app_label, r.model_name, r.task_id,
                                r.attempt + 1, r.timeout_seconds, s, false;
            CONTINUE;
        END IF;
        UPDATE streaming_taskrun t
           SET status = 'running', attempt = t.attempt + 1, lease_owner = p_owner,
               lease_expires_at = now() + make_interval(secs => p_ttl),
               started_at = now(), updated_at = now()
         WHERE t.id = r.id
        RETURNING * INTO r;
        IF r.attempt > 1 THEN
            PERFORM streaming_append(r.id, r.attempt, 'retry', jsonb_build_object(
                'attempt', r.attempt, 'max_attempts', r.max_attempts));
            SELECT * INTO r FROM streaming_taskrun t WHERE t.id = r.id;
        END IF;
        RETURN QUERY SELECT true, r.id, r.app_label, r.model_name, r.task_id, r.attempt,
                            r.timeout_seconds, r.last_seq, r.cancel_requested_at IS NOT NULL;
        RETURN;
    END LOOP;
END $$;
