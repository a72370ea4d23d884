#!/usr/bin/env bash
# init-shard.sh: make this new server a shard of the coordinator, master-db. Runs once, at the
# shard's first start (the sharded layout only: docs/sharding.md).
#
# A shard holds some partitions of tbl_users as real tables. The coordinator keeps the parent table,
# and in place of each of those partitions a *foreign table* (postgres_fdw) that stands for the
# shard's real one. The application only ever reads and writes the coordinator's tbl_users: the
# coordinator routes each row by the hash of its id, as it does for local partitions, but to the
# server that holds that partition.
#
# The postgres image runs this script from /docker-entrypoint-initdb.d/, on the shard's temporary
# server (Unix socket only); local_cluster.py --sharded runs it at the same step. It does two things:
#   1. on this shard: the role the coordinator logs in as, a tbl_users with real tables for its
#      partitions, with the coordinator's bounds, and a view that says who the shard is. So the shard
#      enforces the partition rule itself: a row sent to the wrong shard is refused here ("violates
#      partition constraint").
#   2. on the coordinator, as its superuser, in one transaction: a postgres_fdw server for this shard,
#      a user mapping (which role and password to log in with), a foreign table that reads the
#      shard's view, and each of its partitions swapped for a foreign table. The coordinator's
#      replicas receive all that by streaming replication.
# Compose calls the shard healthy only once this has finished, so `docker compose --profile sharded
# up -d --wait` returns with the layout complete.
#
# Inputs (environment):
#   SHARD_SERVER            the coordinator's name for this shard's foreign server, e.g. shard_one
#   SHARD_PARTITIONS        the partitions this shard holds, e.g. "tbl_users_p0 tbl_users_p2"
#   SHARD_HOST, SHARD_PORT  where the coordinator reaches this shard (compose: shard-one, 5432)
#   COORDINATOR_HOST, COORDINATOR_PORT  where this script reaches the coordinator
#   COORDINATOR_PASSWORD    the password of the role `coordinator` that the coordinator logs in as
#   POSTGRES_PASSWORD       the superuser's password (the image's variable), the same on every server
#
# The body runs in a subshell, so that if the image sources this file (when it is not executable),
# its `set` options stay in here.
(
    set -euo pipefail
    : "${SHARD_SERVER:?}" "${SHARD_PARTITIONS:?}" "${SHARD_HOST:?}" "${COORDINATOR_HOST:?}"
    : "${COORDINATOR_PASSWORD:?}" "${POSTGRES_PASSWORD:?}"
    local_psql=(psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username=postgres --dbname=postgres)
    # On the coordinator: over TCP with the superuser's password (libpq reads PGPASSWORD, so it is not in
    # the process list), and with log_statement off for this session, so that the password in the user
    # mapping below does not land in the coordinator's statement log.
    coordinator_psql=("${local_psql[@]}" --host="$COORDINATOR_HOST" --port="${COORDINATOR_PORT:-5432}")
    export PGPASSWORD="$POSTGRES_PASSWORD" PGOPTIONS="-c log_statement=none"

    # 1. This shard's role and tables. The bounds are the coordinator's own, read from its catalog.
    "${local_psql[@]}" -v password="$COORDINATOR_PASSWORD" <<'SQL'
-- The coordinator logs in with a role of its own, not the superuser: it may read, write and empty the
-- shard's rows, and nothing else. Its password is checked with scram-sha-256 (pg_hba.conf).
CREATE ROLE coordinator LOGIN PASSWORD :'password';
-- The same parent as the coordinator's; its primary key makes each id unique on this shard, and so
-- everywhere: equal ids hash to the same partition, so they could only meet on the same shard.
CREATE TABLE tbl_users (
    id         UUID         NOT NULL,
    first_name VARCHAR(255) NOT NULL,
    PRIMARY KEY (id)
) PARTITION BY HASH (id);
-- Who this shard is: its cluster (initdb made the system identifier), since when it runs, and which
-- database. The demo asks this twice, on the shard itself and through the coordinator (which reads
-- it with a foreign table, below): the same answer proves that its SHARD_* settings reach the very
-- shard the coordinator stores on. (A view's functions are called with the privileges of whoever
-- reads it; these three may be called by any role, so the coordinator needs only SELECT on it.)
CREATE VIEW shard_identity AS
    SELECT system_identifier, pg_postmaster_start_time() AS started_at, current_database() AS database
    FROM pg_control_system();
GRANT SELECT ON shard_identity TO coordinator;
SQL
    for partition in $SHARD_PARTITIONS; do
        bound=$("${coordinator_psql[@]}" --tuples-only --no-align -v name="$partition" \
            <<<"SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE oid = to_regclass(:'name')")
        "${local_psql[@]}" -v name="$partition" -v bound="$bound" <<'SQL'
-- format() quotes the name (%I); the bound is the coordinator's own SQL, e.g.
-- FOR VALUES WITH (modulus 4, remainder 0). \gexec runs the statement that the query returns.
SELECT format('CREATE TABLE %I PARTITION OF tbl_users %s', :'name', :'bound') \gexec
SELECT format('GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON %I TO coordinator', :'name') \gexec
SQL
    done

    # 2. On the coordinator, in one transaction: all of it, or none.
    "${coordinator_psql[@]}" --single-transaction -v server="$SHARD_SERVER" -v host="$SHARD_HOST" \
        -v port="${SHARD_PORT:-5432}" -v password="$COORDINATOR_PASSWORD" -v partitions="$SHARD_PARTITIONS" <<'SQL'
-- Both shards attach at about the same time: the lock makes the second wait for the first.
LOCK TABLE tbl_users IN ACCESS EXCLUSIVE MODE;
CREATE EXTENSION IF NOT EXISTS postgres_fdw;
-- A unique index cannot span foreign tables, so the parent gives up its primary key; each shard's
-- own primary key keeps the ids unique (above).
ALTER TABLE tbl_users DROP CONSTRAINT IF EXISTS tbl_users_pkey;
-- async_capable: a query across shards scans them at the same time (Async Foreign Scan).
-- parallel_commit: at COMMIT, send every shard its COMMIT at once, then wait for all the answers.
-- batch_size: rows inserted through the coordinator go to a shard 1,000 at a time.
CREATE SERVER :"server" FOREIGN DATA WRAPPER postgres_fdw OPTIONS (
    host :'host', port :'port', dbname 'postgres',
    async_capable 'true', parallel_commit 'true', batch_size '1000'
);
-- Every local user reaches this shard as `coordinator`. (The password is kept in the catalog, where
-- only superusers can read it, in pg_user_mappings.)
CREATE USER MAPPING FOR PUBLIC SERVER :"server" OPTIONS (user 'coordinator', password :'password');
-- This shard's answer to "who are you?" (its view shard_identity, above), e.g. shard_one_identity.
SELECT format('CREATE FOREIGN TABLE %I (system_identifier bigint, started_at timestamptz, database name) '
              'SERVER %I OPTIONS (schema_name %L, table_name %L)',
              :'server' || '_identity', :'server', 'public', 'shard_identity') \gexec
-- Swap each of this shard's (empty) partitions for a foreign table with the same bound, on this
-- shard. The query writes the statements, with each partition's bound as it is now; \gexec runs
-- them in order. A partition that holds rows is refused: moving rows is docs/sharding.md's
-- rebalancing, not a first start.
SELECT format('DO $$BEGIN IF EXISTS (SELECT FROM %I) THEN RAISE EXCEPTION %L; END IF; END$$',
              c.relname, c.relname || ' holds rows: start the sharded layout from empty volumes'),
       format('ALTER TABLE tbl_users DETACH PARTITION %I', c.relname),
       format('DROP TABLE %I', c.relname),
       format('CREATE FOREIGN TABLE %I PARTITION OF tbl_users %s SERVER %I OPTIONS (schema_name %L, table_name %L)',
              c.relname, pg_get_expr(c.relpartbound, c.oid), :'server', 'public', c.relname)
FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
WHERE i.inhparent = 'tbl_users'::regclass AND c.relname = ANY (string_to_array(:'partitions', ' '))
ORDER BY c.relname \gexec
SQL
    echo "init-shard.sh: $SHARD_SERVER holds $SHARD_PARTITIONS for $COORDINATOR_HOST"
)
