-- init-master.sql: run once, on the primary only, when its data directory is first created.
--
-- The official postgres image runs every *.sql file in /docker-entrypoint-initdb.d/ with psql
-- (as the superuser, on the "postgres" database); local_cluster.py does the same with its own psql.
-- The replicas never run it: they are byte-for-byte copies of the primary, so the role and the
-- tables below reach them through pg_basebackup and streaming replication.

\set ON_ERROR_STOP on

-- ------------------------------------------------------------------------------------------------
-- 1. The role the replicas log in as to stream WAL.
-- ------------------------------------------------------------------------------------------------

-- The password comes from the REPLICATOR_PASSWORD environment variable (docker-compose.yml sets
-- it, with the demo's default). \getenv is a psql meta-command (psql 15 and later): it copies an
-- environment variable into a psql variable without the password ever being written in this file.
\getenv replicator_password REPLICATOR_PASSWORD
\if :{?replicator_password}
\else
    \set replicator_password replicator_password
\endif

-- REPLICATION lets the role open replication connections: pg_basebackup and WAL streaming. That
-- is a very powerful right (PostgreSQL's docs call it "very highly privileged"): a replication
-- connection copies every data file of the server, every table's rows included. So the role has
-- a password of its own, and pg_hba.conf lets it in only for replication, from this machine or
-- the compose network. It is not a superuser and owns nothing.
-- CONNECTION LIMIT 5 caps its ordinary connections (replica-bootstrap.sh opens one to make its
-- slot); it does not count replication connections, which max_wal_senders caps (postgresql.conf).
-- :'replicator_password' makes psql insert the value as a correctly quoted SQL literal.
CREATE ROLE replicator WITH REPLICATION LOGIN CONNECTION LIMIT 5 PASSWORD :'replicator_password';

-- ------------------------------------------------------------------------------------------------
-- 2. The hash-partitioned table.
-- ------------------------------------------------------------------------------------------------

-- The parent table holds no rows itself. PARTITION BY HASH (id) makes PostgreSQL compute a hash
-- of each row's id and store the row in the partition whose remainder matches that hash modulo
-- the partitions' modulus. The primary key must include the partition key; here it *is* the key.
CREATE TABLE tbl_users (
    id         UUID         NOT NULL,
    first_name VARCHAR(255) NOT NULL,
    PRIMARY KEY (id)
) PARTITION BY HASH (id);

-- Four partitions: every possible hash lands in exactly one of remainders 0..3 of modulus 4.
-- Each partition is an ordinary table you can query on its own (SELECT * FROM tbl_users_p2).
CREATE TABLE tbl_users_p0 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 4, REMAINDER 0);
CREATE TABLE tbl_users_p1 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 4, REMAINDER 1);
CREATE TABLE tbl_users_p2 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 4, REMAINDER 2);
CREATE TABLE tbl_users_p3 PARTITION OF tbl_users FOR VALUES WITH (MODULUS 4, REMAINDER 3);
