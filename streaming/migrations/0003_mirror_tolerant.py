# Wraps migrations_sql/0003_mirror_tolerant.sql.

from django.db import migrations

from streaming import schema


class Migration(migrations.Migration):

    dependencies = [
        ("streaming", "0002_append_batch"),
    ]

    operations = [
        # Reversing keeps the tolerant trigger function (harmless); only the record goes.
        migrations.RunSQL(
            schema.read("0003_mirror_tolerant.sql"),
            "DELETE FROM streaming_schema_file WHERE name = '0003_mirror_tolerant.sql';",
        ),
    ]
