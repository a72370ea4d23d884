-- move-partition.sql: move one partition of tbl_users from one shard to another (rebalancing).
--
-- Run on the coordinator, master-db, once the partition's new, empty table exists on the target
-- shard (docs/sharding.md, "Rebalancing"); tests/test_sharding.py runs this same file:
--
--   psql -v partition=tbl_users_p2 -v target=shard_two -f docs/move-partition.sql
--
-- One transaction on the coordinator: copy the rows to the target shard through a new foreign
-- table, then swap that table in as the partition. Either all of it happens or none of it does,
-- on the coordinator. On the shards there is no two-phase commit: if the coordinator's COMMIT
-- failed after the target shard had committed the copy, the copy would stay there unused, and the
-- partition would still be read from its old shard. So no row is lost, and none is read twice.
-- The old copy, on the old shard, is dropped afterwards, by hand, once the counts agree.

\set ON_ERROR_STOP on
BEGIN;

-- No one may write to tbl_users through the coordinator while the partition moves (a foreign
-- table cannot be locked itself); reads go on until the swap.
LOCK TABLE tbl_users IN EXCLUSIVE MODE;

-- A foreign table for the partition's new home, with the parent's columns.
SELECT format('CREATE FOREIGN TABLE %I (id uuid NOT NULL, first_name varchar(255) NOT NULL) '
              'SERVER %I OPTIONS (schema_name %L, table_name %L)',
              :'partition' || '_moving', :'target', 'public', :'partition') \gexec

-- Copy the rows: read from the old shard, written to the new one, through the coordinator.
SELECT format('INSERT INTO %I SELECT * FROM %I', :'partition' || '_moving', :'partition') \gexec

-- Swap: the new foreign table becomes the partition, with the same bound; the old one is dropped
-- (a foreign table: dropping it drops nothing on the old shard).
SELECT format('ALTER TABLE tbl_users DETACH PARTITION %I', :'partition'),
       format('ALTER TABLE tbl_users ATTACH PARTITION %I %s', :'partition' || '_moving',
              pg_get_expr(relpartbound, oid)),
       format('DROP FOREIGN TABLE %I', :'partition'),
       format('ALTER FOREIGN TABLE %I RENAME TO %I', :'partition' || '_moving', :'partition')
FROM pg_class WHERE oid = to_regclass(:'partition') \gexec

COMMIT;
