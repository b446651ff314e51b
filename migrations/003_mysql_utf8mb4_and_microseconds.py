"""MySQL/MariaDB only: text stored as utf8mb4 and compared byte for byte, times kept to
the microsecond. SQLite and PostgreSQL already behave so; there it changes nothing.

Without it a MariaDB database created with the server's defaults would compare the
email and code keys accent- and case-insensitively (utf8mb4_general_ci: "josé" equals
"jose"), could not store text outside its default character set, and would cut every
time to the second. Both changes only widen: every stored value is kept as it is.
"""

import peewee as pw
from peewee_migrate import Migrator

TABLES = ("students", "courses", "student_courses")
TIMES = (
    ("students", "create_time"),
    ("courses", "create_time"),
    ("student_courses", "enroll_time"),
)


def migrate(migrator: Migrator, database: pw.Database, *, fake=False):
    if not isinstance(database, pw.MySQLDatabase):
        return
    for table in TABLES:
        migrator.sql(f"ALTER TABLE `{table}` CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    for table, column in TIMES:
        migrator.sql(f"ALTER TABLE `{table}` MODIFY `{column}` DATETIME(6) NOT NULL")


def rollback(migrator: Migrator, database: pw.Database, *, fake=False):
    # The wider types stay: narrowing them back could change stored values (a name
    # outside the old character set, the fraction of a second), and the code of
    # 002 reads and writes them just as well.
    return
