-- Every statement the package runs, by name. Loaded by streaming/queries.py.

-- enqueue --
-- Create the run of a task (pending) unless it exists; returns the run either way.
INSERT INTO streaming_taskrun (app_label, model_name, task_id, db_table, pk_column,
                               max_attempts, timeout_seconds)
VALUES (%(app_label)s, %(model_name)s, %(task_id)s, %(db_table)s, %(pk_column)s,
        %(max_attempts)s, %(timeout_seconds)s)
ON CONFLICT (app_label, model_name, task_id) DO UPDATE SET updated_at = streaming_taskrun.updated_at
RETURNING id, status, (xmax = 0) AS created;

-- get_run --
SELECT id, app_label, model_name, task_id, status, attempt, last_seq, final_value, error,
       started_at, finished_at, lease_owner, lease_expires_at, cancel_requested_at, created_at
  FROM streaming_taskrun
 WHERE app_label = %(app_label)s AND model_name = %(model_name)s AND task_id = %(task_id)s;

-- run_status --
SELECT status FROM streaming_taskrun
 WHERE app_label = %(app_label)s AND model_name = %(model_name)s AND task_id = %(task_id)s;

-- active_runs --
-- Queued or running tasks of one model (the claimable index covers the status filter).
SELECT count(*) FROM streaming_taskrun
 WHERE app_label = %(app_label)s AND model_name = %(model_name)s
   AND status IN ('pending', 'running') AND %(task_id)s IS NOT NULL;

-- last_seqs --
SELECT id, last_seq FROM streaming_taskrun WHERE id = ANY(%(run_ids)s);

-- claim --
-- One row per run: the one claimed (claimed = true), and any failed on the way (attempts
-- used up: their error and end are written, and must be announced).
SELECT claimed, id, app_label, model_name, task_id, attempt, timeout_seconds, last_seq,
       cancel_requested
  FROM streaming_claim(%(owner)s, %(ttl)s, %(run_id)s);

-- heartbeat --
-- Renew the leases this worker still holds; a run missing from the result was lost.
UPDATE streaming_taskrun r
   SET lease_expires_at = now() + make_interval(secs => %(ttl)s)
  FROM unnest(%(run_ids)s::bigint[], %(attempts)s::integer[]) AS h(run_id, attempt)
 WHERE r.id = h.run_id AND r.attempt = h.attempt AND r.status = 'running'
   AND r.lease_owner = %(owner)s
RETURNING r.id, r.cancel_requested_at IS NOT NULL AS cancel_requested;

-- append_batch --
-- At most once per (writer, batch): a retried batch returns the rows of its first commit.
SELECT ord, seq, created_at, data, app_label, model_name, task_id
  FROM streaming_append_batch_once(%(writer)s, %(batch)s, %(run_ids)s::bigint[],
       %(attempts)s::integer[], %(types)s::text[], %(datas)s::jsonb[]);

-- finish --
SELECT streaming_finish(%(run_id)s, %(attempt)s, %(status)s, %(final_value)s::jsonb, %(error)s::jsonb);

-- finish_unowned --
SELECT streaming_finish_unowned(%(run_id)s, %(status)s, %(final_value)s::jsonb, %(error)s::jsonb);

-- release --
-- Give a run back without finishing it (graceful shutdown): claimable at once.
UPDATE streaming_taskrun
   SET status = 'pending', releases = releases + 1, lease_owner = NULL,
       lease_expires_at = NULL, queued_at = now(), updated_at = now()
 WHERE id = %(run_id)s AND attempt = %(attempt)s AND status = 'running'
RETURNING id;

-- request_cancel --
UPDATE streaming_taskrun
   SET cancel_requested_at = coalesce(cancel_requested_at, now()), updated_at = now()
 WHERE app_label = %(app_label)s AND model_name = %(model_name)s AND task_id = %(task_id)s
   AND status IN ('pending', 'running')
RETURNING id, status, lease_owner, lease_expires_at < now() AS lease_expired;

-- read_events --
-- The rows themselves, for a check that the frames composed in SQL (read_frames) equal
-- those streaming.events.build composes from rows (tests/integration/test_event_log.py).
SELECT seq, event_type, data::text, created_at, attempt
  FROM streaming_taskevent
 WHERE app_label = %(app_label)s AND model_name = %(model_name)s AND task_id = %(task_id)s
   AND seq > %(after)s
 ORDER BY seq
 LIMIT %(limit)s;

-- read_frames --
-- A page of events as ready SSE frames, at most %(limit)s rows and about %(max_bytes)s
-- bytes (see streaming_read_frames in migrations_sql/0002 and 0006).
SELECT seq, event_type, frame FROM streaming_read_frames(
    %(app_label)s, %(model_name)s, %(task_id)s, %(after)s, %(limit)s, %(meta)s,
    %(max_bytes)s::bigint);

-- read_last_event --
SELECT seq, event_type, data::text, created_at, attempt
  FROM streaming_taskevent
 WHERE app_label = %(app_label)s AND model_name = %(model_name)s AND task_id = %(task_id)s
 ORDER BY seq DESC
 LIMIT 1;

-- event_types --
SELECT DISTINCT event_type FROM streaming_taskevent
 WHERE app_label = %(app_label)s AND model_name = %(model_name)s AND task_id = %(task_id)s;

-- notify --
-- Sent after the rows it announces were committed durably, so its own commit need not wait
-- for a WAL flush: a NOTIFY lost to a crash costs latency only (listeners poll the log).
SELECT pg_notify(%(channel)s, %(payload)s), set_config('synchronous_commit', 'off', true);

-- old_runs --
SELECT id, app_label, model_name, task_id, db_table, pk_column
  FROM streaming_taskrun
 WHERE finished_at < now() - make_interval(secs => %(hours)s * 3600);

-- delete_events --
DELETE FROM streaming_taskevent
 WHERE app_label = %(app_label)s AND model_name = %(model_name)s AND task_id = %(task_id)s;

-- forget_writer --
-- A writer's batch record: dropped when its appender closes, or by retention once stale.
DELETE FROM streaming_writer WHERE writer = %(writer)s;

-- stale_writers --
DELETE FROM streaming_writer WHERE updated_at < now() - make_interval(secs => %(hours)s * 3600);

-- delete_run --
DELETE FROM streaming_taskrun WHERE id = %(run_id)s;

-- delete_task_runs --
-- The admin's delete (in Django's transaction, with the tasks' own rows): runs first, which
-- locks them, so no append can add an event after the events' delete.
DELETE FROM streaming_taskrun
 WHERE app_label = %(app_label)s AND model_name = %(model_name)s
   AND task_id = ANY(%(task_ids)s::bigint[])
RETURNING id, status IN ('pending', 'running');

-- delete_task_events --
DELETE FROM streaming_taskevent
 WHERE app_label = %(app_label)s AND model_name = %(model_name)s
   AND task_id = ANY(%(task_ids)s::bigint[]);

-- notify_in_transaction --
-- A NOTIFY in the caller's transaction, delivered when it commits (the admin's delete).
SELECT pg_notify(%(channel)s, %(payload)s);

-- rerun --
-- Queue a finished task again as a new attempt (migrations_sql/0007_rerun.sql).
SELECT id, last_seq FROM streaming_rerun(%(app_label)s, %(model_name)s, %(task_id)s);
