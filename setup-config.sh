#!/usr/bin/env bash
# setup-config.sh: put this demo's postgresql.conf and pg_hba.conf into the primary's data
# directory, then ask the running server to re-read its configuration.
#
# Runs once, on the primary, while its data directory is being initialised: the official postgres
# image runs /docker-entrypoint-initdb.d/*.sh after the *.sql files (so init-master.sql's
# CREATE ROLE ... PASSWORD is not logged by log_statement = 'all', which this file turns on).
# local_cluster.py runs this same script at the same step.
#
# Inputs (environment): PGDATA, the data directory (the image sets it); CONFIG_DIR, where the two
# .conf files are (default: this script's own folder, which is where docker-compose.yml mounts them).
# POSTGRES_USER and POSTGRES_DB name the superuser and database (the image's variables); psql
# finds the server through its usual defaults or PGHOST and PGPORT, which local_cluster.py sets.
set -euo pipefail

config_dir="${CONFIG_DIR:-$(dirname "${BASH_SOURCE[0]}")}"

# Replace, not append: one readable file per concern is easier to learn from than initdb's
# 800-line template with a few lines added at the end.
cp "$config_dir/postgresql.conf" "$PGDATA/postgresql.conf"
cp "$config_dir/pg_hba.conf" "$PGDATA/pg_hba.conf"

# The server must be able to read its own files (this script already runs as that user, as the
# image's init scripts do; chmod keeps them private to it).
chmod 600 "$PGDATA/postgresql.conf" "$PGDATA/pg_hba.conf"

# pg_hba.conf and most settings take effect on reload. A few (wal_level, max_wal_senders,
# max_replication_slots, shared_buffers, listen_addresses) need a restart: they apply when the
# initialisation step ends and the server is started for real, right after this script.
psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --tuples-only \
    --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    -c 'SELECT pg_reload_conf();' >/dev/null
echo "setup-config.sh: installed postgresql.conf and pg_hba.conf in $PGDATA and reloaded"
