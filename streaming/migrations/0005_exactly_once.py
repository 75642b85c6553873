# Wraps migrations_sql/0005_exactly_once.sql.

from django.db import migrations

from streaming import schema

# Reversing puts back streaming_finish and streaming_claim as 0001 created them.
REVERSE = "\n".join([
    "DROP FUNCTION streaming_append_batch_once;",
    "DROP TABLE streaming_writer;",
    "DROP FUNCTION streaming_claim(text, double precision, bigint);",
    schema.function("0001_initial.sql", "streaming_claim"),
    schema.function("0001_initial.sql", "streaming_finish").replace(
        "CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1),
    "DELETE FROM streaming_schema_file WHERE name = '0005_exactly_once.sql';",
])


class Migration(migrations.Migration):

    dependencies = [
        ("streaming", "0004_drop_append_many"),
    ]

    operations = [
        migrations.RunSQL(schema.read("0005_exactly_once.sql"), REVERSE),
    ]
