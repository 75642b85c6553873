# Wraps migrations_sql/0004_drop_append_many.sql.

from django.db import migrations

from streaming import schema

# Reversing puts the function back as 0001 created it.
RECREATE = "\n".join([
    schema.function("0001_initial.sql", "streaming_append_many"),
    "DELETE FROM streaming_schema_file WHERE name = '0004_drop_append_many.sql';",
])


class Migration(migrations.Migration):

    dependencies = [
        ("streaming", "0003_mirror_tolerant"),
    ]

    operations = [
        migrations.RunSQL(schema.read("0004_drop_append_many.sql"), RECREATE),
    ]
