-- streaming 0001: run state, event log, append / claim / finish functions, history view.
-- Applied by streaming/migrations/0001_initial.py. Append-only: later changes go in new files.

-- Which of these files have been applied: each exactly once (the primary key enforces it).
CREATE TABLE streaming_schema_file (
    name       text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO streaming_schema_file (name) VALUES ('0001_initial.sql');

CREATE TABLE streaming_taskrun (
    id                  bigserial PRIMARY KEY,
    app_label           text        NOT NULL,
    model_name          text        NOT NULL,
    task_id             bigint      NOT NULL,
    db_table            text        NOT NULL,
    pk_column           text        NOT NULL DEFAULT 'id',
    status              text        NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    attempt             integer     NOT NULL DEFAULT 0,
    releases            integer     NOT NULL DEFAULT 0,
    max_attempts        integer     NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    timeout_seconds     double precision,
    lease_owner         text,
    lease_expires_at    timestamptz,
    last_seq            bigint      NOT NULL DEFAULT 0,
    final_value         jsonb,
    error               jsonb,
    cancel_requested_at timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    queued_at           timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT streaming_taskrun_identity UNIQUE (app_label, model_name, task_id)
);

-- The claim query scans only unfinished runs, oldest first.
CREATE INDEX streaming_taskrun_claimable
    ON streaming_taskrun (queued_at, id) WHERE status IN ('pending', 'running');
CREATE INDEX streaming_taskrun_finished_at
    ON streaming_taskrun (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE streaming_taskevent (
    id          bigserial   PRIMARY KEY,
    app_label   text        NOT NULL,
    model_name  text        NOT NULL,
    task_id     bigint      NOT NULL,
    seq         bigint      NOT NULL CHECK (seq >= 1),
    attempt     integer     NOT NULL,
    event_type  text        NOT NULL CHECK (event_type ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    data        jsonb       NOT NULL CHECK (jsonb_typeof(data) = 'object'),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT streaming_taskevent_task_seq UNIQUE (app_label, model_name, task_id, seq)
);

-- Append one event to a running task, fenced on its attempt: NULL (and nothing written)
-- when the caller no longer holds the run. The run row's lock serialises seq per task.
CREATE FUNCTION streaming_append(p_run_id bigint, p_attempt integer, p_type text, p_data jsonb)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    r streaming_taskrun%ROWTYPE;
BEGIN
    UPDATE streaming_taskrun
       SET last_seq = last_seq + 1, updated_at = now()
     WHERE id = p_run_id AND attempt = p_attempt AND status = 'running'
    RETURNING * INTO r;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO streaming_taskevent (app_label, model_name, task_id, seq, attempt, event_type, data)
    VALUES (r.app_label, r.model_name, r.task_id, r.last_seq, p_attempt, p_type, p_data);
    RETURN r.last_seq;
END $$;

-- Append a batch (group commit): one row per input, seq NULL where the append was fenced off.
CREATE FUNCTION streaming_append_many(
    p_run_ids bigint[], p_attempts integer[], p_types text[], p_datas jsonb[])
RETURNS TABLE (ord integer, seq bigint) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_run_ids, 1), 0) LOOP
        ord := i;
        seq := streaming_append(p_run_ids[i], p_attempts[i], p_types[i], p_datas[i]);
        RETURN NEXT;
    END LOOP;
END $$;

-- Write the terminal events and the final state in one transaction, fenced on attempt.
-- p_status: completed | failed | cancelled. Returns the last seq, or NULL if fenced off.
CREATE FUNCTION streaming_finish(
    p_run_id bigint, p_attempt integer, p_status text, p_final_value jsonb, p_error jsonb)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    s bigint;
    end_data jsonb;
BEGIN
    IF p_status = 'failed' AND p_error IS NOT NULL THEN
        s := streaming_append(p_run_id, p_attempt, 'error', p_error);
        IF s IS NULL THEN RETURN NULL; END IF;
    ELSIF p_status = 'cancelled' THEN
        s := streaming_append(p_run_id, p_attempt, 'cancelled',
                              coalesce(p_error, '{"message": "cancelled"}'::jsonb));
        IF s IS NULL THEN RETURN NULL; END IF;
    END IF;
    end_data := jsonb_build_object('status', p_status, 'final_value', p_final_value);
    IF p_error IS NOT NULL THEN
        end_data := end_data || jsonb_build_object('error', p_error);
    END IF;
    s := streaming_append(p_run_id, p_attempt, 'end', end_data);
    IF s IS NULL THEN RETURN NULL; END IF;
    UPDATE streaming_taskrun
       SET status = p_status, final_value = p_final_value, error = p_error,
           finished_at = now(), updated_at = now(), lease_owner = NULL, lease_expires_at = NULL
     WHERE id = p_run_id;
    RETURN s;
END $$;

-- Finish a run that no worker holds (pending, or its lease expired): used for cancelling
-- a queued task and for failing a task past max_attempts. Bumps the attempt so that a
-- late worker of the old attempt is fenced off.
CREATE FUNCTION streaming_finish_unowned(
    p_run_id bigint, p_status text, p_final_value jsonb, p_error jsonb)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    a integer;
BEGIN
    UPDATE streaming_taskrun
       SET attempt = attempt + 1, status = 'running', lease_owner = NULL
     WHERE id = p_run_id AND status IN ('pending', 'running')
    RETURNING attempt INTO a;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    RETURN streaming_finish(p_run_id, a, p_status, p_final_value, p_error);
END $$;

-- Claim the oldest claimable run: pending, or running with an expired lease. A run whose
-- attempts are used up is failed instead, and the search goes on. Never blocks on a row
-- another worker holds (SKIP LOCKED).
CREATE FUNCTION streaming_claim(p_owner text, p_ttl double precision, p_run_id bigint)
RETURNS SETOF streaming_taskrun LANGUAGE plpgsql AS $$
DECLARE
    r streaming_taskrun%ROWTYPE;
BEGIN
    LOOP
        SELECT * INTO r FROM streaming_taskrun
         WHERE (status = 'pending' OR (status = 'running' AND lease_expires_at < now()))
           AND (p_run_id IS NULL OR id = p_run_id)
         ORDER BY queued_at, id
         LIMIT 1
         FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        IF r.attempt - r.releases >= r.max_attempts THEN
            PERFORM streaming_finish_unowned(r.id, 'failed', NULL, jsonb_build_object(
                'message', format('lease expired on attempt %s of %s', r.attempt, r.max_attempts),
                'error_type', 'LeaseExpired'));
            CONTINUE;
        END IF;
        UPDATE streaming_taskrun
           SET status = 'running', attempt = attempt + 1, lease_owner = p_owner,
               lease_expires_at = now() + make_interval(secs => p_ttl),
               started_at = now(), updated_at = now()
         WHERE id = r.id
        RETURNING * INTO r;
        IF r.attempt > 1 THEN
            PERFORM streaming_append(r.id, r.attempt, 'retry', jsonb_build_object(
                'attempt', r.attempt, 'max_attempts', r.max_attempts));
            SELECT * INTO r FROM streaming_taskrun WHERE id = r.id;
        END IF;
        RETURN NEXT r;
        RETURN;
    END LOOP;
END $$;

-- Mirror the run state onto the task's own row (status, attempt, started_at, completed_at,
-- final_value, error) in the same transaction, so the Django model reads it without a join.
CREATE FUNCTION streaming_mirror_run() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format(
        'UPDATE %I SET status = $1, attempt = $2, started_at = $3, completed_at = $4, '
        'final_value = $5, error = $6, updated_at = now() WHERE %I = $7',
        NEW.db_table, NEW.pk_column)
    USING NEW.status, NEW.attempt, NEW.started_at, NEW.finished_at, NEW.final_value,
          NEW.error, NEW.task_id;
    RETURN NULL;
END $$;

CREATE TRIGGER streaming_taskrun_mirror
    AFTER UPDATE ON streaming_taskrun
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.attempt IS DISTINCT FROM NEW.attempt)
    EXECUTE FUNCTION streaming_mirror_run();

CREATE VIEW streaming_task_history AS
SELECT e.app_label, e.model_name, e.task_id, e.seq, e.attempt AS event_attempt,
       e.event_type, e.data, e.created_at,
       r.status, r.attempt AS run_attempt, r.started_at, r.finished_at, r.id AS run_id
  FROM streaming_taskevent e
  JOIN streaming_taskrun r USING (app_label, model_name, task_id)
 ORDER BY e.app_label, e.model_name, e.task_id, e.seq;
