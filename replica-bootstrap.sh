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
#
# What a replication slot holds, and why this script creates it first
# ------------------------------------------------------------------
# The primary writes every change to its write-ahead log (WAL), in 16 MB segment files, and a
# checkpoint deletes (or recycles) the segments it no longer needs for its own crash recovery.
# A standby replays that same WAL, so it needs every segment from the moment its copy was taken,
# even those the primary itself is done with. A physical replication slot is the primary's promise
# to keep them: it records the oldest WAL position the standby still needs (restart_lsn), and no
# checkpoint deletes a segment at or after it. The standby moves restart_lsn forward as it
# receives WAL, so the primary can delete what every standby has.
#
# Why a fresh `docker compose up` used to fail about half the time: compose starts both replicas
# at once, and each pg_basebackup makes the primary switch to a new WAL segment and checkpoint.
# With `pg_basebackup --create-slot`, the slot is created only AFTER that checkpoint, when the
# WAL stream starts. So the other replica's checkpoint could come in between and delete the
# segment where this copy begins, before any slot protected it:
#     ERROR:  requested WAL segment 000000010000000000000002 has already been removed
# and pg_basebackup gave up, the container exited, and `up --wait` failed.
#
# The fix: create the slot FIRST, with its WAL reserved at once, and only then start the copy.
# The copy begins at a checkpoint taken after the slot existed, so every segment it needs is
# already held, whatever the other replica does meanwhile. (postgresql.conf's
# max_slot_wal_keep_size bounds how much a slot may hold, so an absent replica cannot fill the
# primary's disk.)
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

    # 1. Reserve this replica's WAL on the primary, before anything is copied.
    #    A slot of this name left by an earlier replica (whose data directory has since been
    #    deleted, or whose clone failed) holds WAL that nobody will ask for: drop it if no standby
    #    is using it. If one is, creating the slot fails with "already exists", which is the truth:
    #    two replicas must not share a slot.
    #    immediately_reserve => true makes the slot hold WAL from now on, rather than from the
    #    first time a standby connects to it.
    psql "${replication_source[@]}" --dbname=postgres --no-psqlrc --quiet --tuples-only \
        -v ON_ERROR_STOP=1 -v slot="$REPLICA_SLOT" >/dev/null <<'SQL'
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
WHERE slot_name = :'slot' AND NOT active;
SELECT pg_create_physical_replication_slot(:'slot', immediately_reserve => true);
SQL

    # 2. Copy the primary's whole data directory over a replication connection:
    #   -X stream  also stream the WAL written while the copy runs, so the copy is consistent;
    #   -S         stream it through the slot made above (which already holds that WAL);
    #   -R         write the standby configuration for us: standby.signal, plus primary_conninfo
    #              and primary_slot_name in postgresql.auto.conf (no hand-written settings).
    #              Note: primary_conninfo then holds the replicator's password, in plain text, in
    #              the replica's data directory (readable by its postgres user only). The usual
    #              remedy is a password file instead: a ~/.pgpass line for the replicator, or
    #              passfile= in primary_conninfo, with PGPASSWORD left unset here;
    #   --checkpoint=fast  start the copy now instead of waiting for the next checkpoint.
    # If the copy fails, pg_basebackup deletes what it copied, and the next start tries again.
    pg_basebackup "${replication_source[@]}" --pgdata="$PGDATA" \
        --wal-method=stream --slot="$REPLICA_SLOT" --write-recovery-conf \
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
