# Wraps migrations_sql/0004_drop_append_many.sql.

from django.db import migrations

from streaming import schema

# Reversing puts the function back as 0001 created it.
RECREATE = """
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
DELETE FROM streaming_schema_file WHERE name = '0004_drop_append_many.sql';
"""


class Migration(migrations.Migration):

    dependencies = [
        ("streaming", "0003_mirror_tolerant"),
    ]

    operations = [
        migrations.RunSQL(schema.read("0004_drop_append_many.sql"), RECREATE),
    ]
