# Wraps migrations_sql/0006_page_bytes.sql.

from django.db import migrations

from streaming import schema

REVERSE = """
DROP FUNCTION streaming_read_frames(text, text, bigint, bigint, integer, text, bigint);
DELETE FROM streaming_schema_file WHERE name = '0006_page_bytes.sql';
"""


class Migration(migrations.Migration):

    dependencies = [
        ("streaming", "0005_exactly_once"),
    ]

    operations = [
        migrations.RunSQL(schema.read("0006_page_bytes.sql"), REVERSE),
    ]
