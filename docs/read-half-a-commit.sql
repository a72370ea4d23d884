-- read-half-a-commit.sql: a reader on the coordinator sees half of a transaction that committed whole.
--
-- Run on master-db, on the sharded layout (docs/sharding.md, "A read that sees half of a commit");
-- tests/test_sharding.py runs this same file:
--
--   psql -X -f docs/read-half-a-commit.sql
--
-- Two sessions: this one reads, and a second psql (run from here with \!) writes. The writer
-- inserts Ann and Ben in one transaction; Ann's row belongs on shard-one, Ben's on shard-two.
-- postgres_fdw opens the reader's transaction on a shard only when a query first reaches that
-- shard, and each shard takes its own snapshot then. So the reader, which reached shard-one before
-- the commit and shard-two after it, sees Ben and not Ann. On the default layout, where one server
-- holds every partition, the reader's one snapshot sees neither.
--
-- The inner psql reaches master-db the way this one did only through the environment (PGHOST,
-- PGPORT, PGUSER, PGPASSWORD), so set those rather than -h and -p.

\set ON_ERROR_STOP on

-- Two new ids, one for tbl_users_p0 (shard-one) and one for tbl_users_p1 (shard-two).
-- satisfies_hash_partition() is the server's own test of a row against a partition's bound.
SELECT id AS ann FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, 100)) AS candidates
WHERE satisfies_hash_partition('tbl_users'::regclass, 4, 0, id) LIMIT 1 \gset
SELECT id AS ben FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, 100)) AS candidates
WHERE satisfies_hash_partition('tbl_users'::regclass, 4, 1, id) LIMIT 1 \gset

-- The reader's transaction: its first query reaches shard-one only, which takes a snapshot now.
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT count(*) AS "rows in tbl_users_p0" FROM tbl_users_p0;

-- The writer: one INSERT, one transaction, committed on both shards before psql returns.
\setenv ANN :ann
\setenv BEN :ben
\! psql -X -c "INSERT INTO tbl_users (id, first_name) VALUES ('$ANN', 'Ann'), ('$BEN', 'Ben')"

-- The reader again, in the same transaction. shard-one answers from its old snapshot: no Ann.
-- shard-two is reached only now, so its snapshot comes after the commit: Ben.
SELECT first_name, tableoid::regclass AS partition FROM tbl_users WHERE id IN (:'ann', :'ben');
COMMIT;

-- A new transaction, with new snapshots on both shards: both rows.
SELECT first_name, tableoid::regclass AS partition FROM tbl_users WHERE id IN (:'ann', :'ben');

-- Leave the table as it was: these ids are UUIDv4, and the demo's report reads the smallest id.
DELETE FROM tbl_users WHERE id IN (:'ann', :'ben');
