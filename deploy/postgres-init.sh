#!/bin/sh
# Runs once, when the Postgres volume is first initialised: the app database (served by
# Hasura, synced by fusionsync) and FusionAuth's database with its own user.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" <<SQL
create database app;
create user fusionauth with password '$FUSIONAUTH_DB_PASSWORD';
create database fusionauth owner fusionauth;
SQL
