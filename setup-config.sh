#!/usr/bin/env bash
# setup-config.sh: put this demo's postgresql.conf and pg_hba.conf into the primary's data
# directory.
#
# Runs once, on the primary, while its data directory is being initialised: the official postgres
# image runs /docker-entrypoint-initdb.d/* in name order, so this file (02-...) comes after
# init-master.sql (01-...). local_cluster.py runs this same script at the same step.
#
# The image *executes* a *.sh file that is executable and *sources* one that is not (a checkout
# can lose the executable bit, on Windows say). Sourced, a script runs inside the entrypoint's own
# shell, so the body below runs in a subshell, ( ... ): its `set` options and variables stay in
# there, and if it fails, the entrypoint stops with an error either way.
#
# Inputs (environment): PGDATA, the data directory (the image sets it); CONFIG_DIR, where the two
# .conf files are (default: this script's own folder, which is where docker-compose.yml mounts them).
(
    set -euo pipefail

    config_dir="${CONFIG_DIR:-$(dirname "${BASH_SOURCE[0]}")}"

    # Replace, not append: one readable file per concern is easier to learn from than initdb's
    # 800-line template with a few lines added at the end.
    cp "$config_dir/postgresql.conf" "$PGDATA/postgresql.conf"
    cp "$config_dir/pg_hba.conf" "$PGDATA/pg_hba.conf"

    # The server must be able to read its own files (this script already runs as that user, as the
    # image's init scripts do; chmod keeps them private to it).
    chmod 600 "$PGDATA/postgresql.conf" "$PGDATA/pg_hba.conf"

    # No reload: the server running now is the image's temporary one, which listens on its Unix
    # socket only and is stopped as soon as the init scripts are done. The real server starts
    # right after that and reads both files then. (A reload here would only make the temporary
    # server log that some settings, such as max_wal_senders, need a restart.)
    echo "setup-config.sh: installed postgresql.conf and pg_hba.conf in $PGDATA"
)
