-- streaming 0002: a set-based batch append that returns what readers need; frames in SQL.
-- Applied by streaming/migrations/0002_append_batch.py. Append-only: later changes go in new files.

INSERT INTO streaming_schema_file (name) VALUES ('0002_append_batch.sql');

-- Append a batch (group commit) in one statement: one row per input, in input order, with
-- the event's seq, created_at, stored data text and task identity, or NULLs where the append
-- was fenced off (the run is not running under that attempt). Same rules as streaming_append:
-- the run row's lock serialises seq per task; seqs follow the input order within a run.
-- The returned data text is the jsonb's own rendering, byte for byte what a read returns, so
-- the writer's process can serve the batch to its local readers without reading it back.
CREATE FUNCTION streaming_append_batch(
    p_run_ids bigint[], p_attempts integer[], p_types text[], p_datas jsonb[])
RETURNS TABLE (ord integer, seq bigint, created_at timestamptz, data text, app_label text,
               model_name text, task_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    r streaming_taskrun%ROWTYPE;
BEGIN
    -- One event (a lone writer): two plain statements beat the set-based plan below.
    IF coalesce(array_length(p_run_ids, 1), 0) = 1 THEN
        UPDATE streaming_taskrun
           SET last_seq = last_seq + 1, updated_at = now()
         WHERE id = p_run_ids[1] AND attempt = p_attempts[1] AND status = 'running'
        RETURNING * INTO r;
        ord := 1;
        IF FOUND THEN
            INSERT INTO streaming_taskevent AS e
                   (app_label, model_name, task_id, seq, attempt, event_type, data)
            VALUES (r.app_label, r.model_name, r.task_id, r.last_seq, p_attempts[1], p_types[1],
                    p_datas[1])
            RETURNING e.seq, e.created_at, e.data::text, e.app_label, e.model_name, e.task_id
                 INTO seq, created_at, data, app_label, model_name, task_id;
        END IF;
        RETURN NEXT;
        RETURN;
    END IF;
    RETURN QUERY
    WITH input AS (
        SELECT i.ord::integer AS ord, i.run_id, i.attempt, i.event_type, i.data,
               row_number() OVER (PARTITION BY i.run_id, i.attempt ORDER BY i.ord) AS n
          FROM unnest(p_run_ids, p_attempts, p_types, p_datas)
               WITH ORDINALITY AS i(run_id, attempt, event_type, data, ord)
    ), bumped AS (
        UPDATE streaming_taskrun t
           SET last_seq = t.last_seq + c.n, updated_at = now()
          FROM (SELECT x.run_id, x.attempt, count(*) AS n
                  FROM input x GROUP BY x.run_id, x.attempt) c
         WHERE t.id = c.run_id AND t.attempt = c.attempt AND t.status = 'running'
        RETURNING t.id, t.attempt, t.app_label, t.model_name, t.task_id, t.last_seq - c.n AS base
    ), inserted AS (
        INSERT INTO streaming_taskevent AS e
               (app_label, model_name, task_id, seq, attempt, event_type, data)
        SELECT b.app_label, b.model_name, b.task_id, b.base + i.n, i.attempt, i.event_type,
               i.data
          FROM input i JOIN bumped b ON b.id = i.run_id AND b.attempt = i.attempt
        RETURNING e.app_label, e.model_name, e.task_id, e.seq, e.created_at, e.data
    )
    SELECT i.ord, x.seq, x.created_at, x.data::text, x.app_label, x.model_name, x.task_id
      FROM input i
      LEFT JOIN bumped b ON b.id = i.run_id AND b.attempt = i.attempt
      LEFT JOIN inserted x ON x.app_label = b.app_label AND x.model_name = b.model_name
                          AND x.task_id = b.task_id AND x.seq = b.base + i.n
     ORDER BY i.ord;
END $$;

-- One page of a task's events after a seq, each as its ready SSE frame:
--   id: <seq>\nevent: <type>\ndata: <the data object plus the metadata>\n\n
-- p_meta is the metadata up to the timestamp's opening quote, composed by the caller
-- (streaming.events.meta_prefix), which composes the same frames for rows it already has
-- (streaming.events.build): the two must stay byte for byte identical. Composing the text
-- here, in C, spares the reader a parse and a format per event. A plain SQL function, so the
-- planner inlines it into the caller's (prepared) query.
CREATE FUNCTION streaming_read_frames(
    p_app_label text, p_model_name text, p_task_id bigint, p_after bigint, p_limit integer,
    p_meta text)
RETURNS TABLE (seq bigint, event_type text, frame text)
LANGUAGE sql STABLE AS $$
SELECT e.seq, e.event_type,
       'id: ' || e.seq || E'\nevent: ' || e.event_type || E'\ndata: '
       || CASE WHEN e.data = '{}'::jsonb THEN '{' ELSE left(e.data::text, -1) || ', ' END
       || p_meta
       || to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US')
       || 'Z", "_seq": ' || e.seq || E'}\n\n'
  FROM streaming_taskevent e
 WHERE e.app_label = p_app_label AND e.model_name = p_model_name AND e.task_id = p_task_id
   AND e.seq > p_after
 ORDER BY e.seq
 LIMIT p_limit
$$;
