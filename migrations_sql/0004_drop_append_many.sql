-- streaming 0004: drop streaming_append_many, which nothing calls any more.
-- Applied by streaming/migrations/0004_drop_append_many.py. Append-only.
-- streaming_append_batch (0002) replaced it for group commit; streaming_append (0001) stays:
-- streaming_finish and streaming_claim append through it.

INSERT INTO streaming_schema_file (name) VALUES ('0004_drop_append_many.sql');

DROP FUNCTION streaming_append_many(bigint[], integer[], text[], jsonb[]);
