#!/usr/bin/env bash
# replica-bootstrap.sh: turn an empty data directory into a hot standby that streams from the
# primary, then (if given a command) run it, normally `postgres`.
#
# Both replicas in docker-compose.yml run this one script, and so does local_cluster.py: the steps
# are written once. On a restart, when the data directory already holds a standby, it skips the
# clone and just starts the server, which resumes streaming where it stopped.
#
# Inputs (environment):
#   PGDATA               the data directory to create
#   PRIMARY_HOST         where the primary is (compose: the service name master-db)
#   PRIMARY_PORT         its port (default 5432)
#   REPLICA_SLOT         this replica's replication slot on the primary, e.g. replica_one
#   REPLICATOR_PASSWORD  the password of the replicator role that init-master.sql created
set -euo pipefail

: "${PGDATA:?PGDATA must name the data directory}"
: "${PRIMARY_HOST:?PRIMARY_HOST must name the primary}"
: "${REPLICA_SLOT:?REPLICA_SLOT must name the replication slot of this replica}"
: "${REPLICATOR_PASSWORD:?REPLICATOR_PASSWORD must be set}"
primary_port="${PRIMARY_PORT:-5432}"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    # libpq reads the password from PGPASSWORD, so it never appears in a process list.
    export PGPASSWORD="$REPLICATOR_PASSWORD"
    replication_source=(--host="$PRIMARY_HOST" --port="$primary_port" --username=replicator)

    # A slot left behind by an earlier replica of the same name (whose data directory has since
    # been deleted) would make `pg_basebackup --create-slot` fail. Drop it if nobody is using it;
    # a slot that a running standby holds is left alone, and pg_basebackup will then say so.
    psql "${replication_source[@]}" --dbname=postgres --no-psqlrc --quiet --tuples-only \
        -v ON_ERROR_STOP=1 -v slot="$REPLICA_SLOT" >/dev/null <<'SQL'
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
WHERE slot_name = :'slot' AND NOT active;
SQL

    # Copy the primary's whole data directory over a replication connection:
    #   -X stream  also stream the WAL written while the copy runs, so the copy is consistent;
    #   -C -S      create a physical replication slot on the primary and use it, so the primary
    #              keeps every WAL segment this replica has not yet received;
    #   -R         write the standby configuration for us: standby.signal, plus primary_conninfo
    #              and primary_slot_name in postgresql.auto.conf (no hand-written settings);
    #   --checkpoint=fast  start the copy now instead of waiting for the next checkpoint.
    pg_basebackup "${replication_source[@]}" --pgdata="$PGDATA" \
        --wal-method=stream --create-slot --slot="$REPLICA_SLOT" --write-recovery-conf \
        --checkpoint=fast --no-password
    unset PGPASSWORD

    # PostgreSQL refuses to start on a data directory that others can read.
    chmod 700 "$PGDATA"
    echo "replica-bootstrap.sh: cloned $PRIMARY_HOST:$primary_port into $PGDATA (slot $REPLICA_SLOT)"
fi

# With a command (compose passes `postgres -c cluster_name=...`), become it, so that the server
# is the container's main process and receives its stop signal. Without one, just clone.
if [ "$#" -gt 0 ]; then
    exec "$@"
fi
