-- streaming 0006: pages of the log bounded in bytes as well as in rows.
-- Applied by streaming/migrations/0006_page_bytes.py. Append-only.

INSERT INTO streaming_schema_file (name) VALUES ('0006_page_bytes.sql');

-- streaming_read_frames (0002), cut once the page holds p_max_bytes of frames: a row is in
-- the page while the frames before it total less than p_max_bytes, so a page holds at least
-- one row and passes the bound by less than one frame. A reader that sees a page of
-- p_limit rows, or of p_max_bytes or more, reads on after its last seq.
CREATE FUNCTION streaming_read_frames(
    p_app_label text, p_model_name text, p_task_id bigint, p_after bigint, p_limit integer,
    p_meta text, p_max_bytes bigint)
RETURNS TABLE (seq bigint, event_type text, frame text)
LANGUAGE sql STABLE AS $$
SELECT f.seq, f.event_type, f.frame
  FROM (SELECT p.seq, p.event_type, p.frame,
               sum(octet_length(p.frame)) OVER (ORDER BY p.seq) - octet_length(p.frame)
                   AS before
          FROM streaming_read_frames(p_app_label, p_model_name, p_task_id, p_after, p_limit,
                                     p_meta) p) f
 WHERE f.before < p_max_bytes
 ORDER BY f.seq
$$;
