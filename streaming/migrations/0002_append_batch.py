# Wraps migrations_sql/0002_append_batch.sql.

from django.db import migrations

from streaming import schema

REVERSE = """
DROP FUNCTION IF EXISTS streaming_append_batch, streaming_read_frames;
DELETE FROM streaming_schema_file WHERE name = '0002_append_batch.sql';
"""


class Migration(migrations.Migration):

    dependencies = [
        ("streaming", "0001_initial"),
    ]

    operations = [
        migrations.RunSQL(schema.read("0002_append_batch.sql"), REVERSE),
    ]
