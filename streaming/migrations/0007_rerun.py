# Wraps migrations_sql/0007_rerun.sql.

from django.db import migrations

from streaming import schema

REVERSE = """
DROP FUNCTION streaming_rerun(text, text, bigint);
DELETE FROM streaming_schema_file WHERE name = '0007_rerun.sql';
"""


class Migration(migrations.Migration):

    dependencies = [
        ("streaming", "0006_page_bytes"),
    ]

    operations = [
        migrations.RunSQL(schema.read("0007_rerun.sql"), REVERSE),
    ]
