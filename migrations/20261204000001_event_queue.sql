-- fusionsync's own schema: the durable event queue and per-entity sync state.
create schema if not exists fusionsync;

create table fusionsync.event (
    id              bigserial primary key,
    -- where the event came from: postgres (trigger), hasura, fusionauth (webhook), reconcile, cli
    source          text        not null,
    -- user | organization | membership (membership events are keyed by organization id)
    entity_kind     text        not null,
    entity_key      text        not null,
    -- to_fusionauth: make FusionAuth match the database; to_database: the other way round
    direction       text        not null default 'to_fusionauth',
    op              text        not null,
    payload         jsonb,
    -- sources that carry an id (Hasura, FusionAuth) record it here so redelivery is a no-op
    dedup_key       text unique,
    state           text        not null default 'pending',
    attempts        integer     not null default 0,
    next_attempt_at timestamptz not null default now(),
    locked_by       text,
    locked_until    timestamptz,
    last_error      text,
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now(),
    processed_at    timestamptz,
    constraint event_state_check check (state in ('pending', 'processing', 'done', 'failed')),
    constraint event_kind_check check (entity_kind in ('user', 'organization', 'membership')),
    constraint event_direction_check check (direction in ('to_fusionauth', 'to_database'))
);

-- the claim query: due pending events in order
create index event_due_idx on fusionsync.event (next_attempt_at, id) where state = 'pending';
-- expired leases of crashed workers
create index event_processing_idx on fusionsync.event (locked_until) where state = 'processing';
-- coalescing: all open events of one entity
create index event_entity_open_idx on fusionsync.event (entity_kind, entity_key)
    where state in ('pending', 'processing');
create index event_failed_idx on fusionsync.event (updated_at) where state = 'failed';
create index event_done_idx on fusionsync.event (processed_at) where state = 'done';

-- One row per entity fusionsync has worked on: the exclusive lease that keeps two workers off
-- the same entity, and the fingerprint of the state both sides last agreed on.
create table fusionsync.entity (
    entity_kind  text        not null,
    entity_key   text        not null,
    fingerprint  text,
    synced_at    timestamptz,
    locked_by    text,
    locked_until timestamptz not null default '-infinity',
    primary key (entity_kind, entity_key)
);

-- Every replay is remembered; the failed event keeps its last error in here too.
create table fusionsync.event_history (
    id         bigserial primary key,
    event_id   bigint      not null references fusionsync.event (id) on delete cascade,
    at         timestamptz not null default now(),
    action     text        not null,
    state      text        not null,
    attempts   integer     not null,
    last_error text
);
create index event_history_event_idx on fusionsync.event_history (event_id);

-- The trigger function behind the Postgres event source. It runs once per statement and
-- records one event per changed row's entity key (argument 2 names the key column), then
-- wakes the workers. pg_notify with the same payload is sent once per transaction.
-- Rows written by fusionsync itself (transaction-local fusionsync.origin = 'fusionauth') are
-- skipped, so syncing FusionAuth into the database never echoes back.
create or replace function fusionsync.record_change() returns trigger
language plpgsql as $$
declare
    kind    text := TG_ARGV[0];
    key_col text := TG_ARGV[1];
begin
    if coalesce(current_setting('fusionsync.origin', true), '') = 'fusionauth' then
        return null;
    end if;
    if TG_OP = 'INSERT' then
        insert into fusionsync.event (source, entity_kind, entity_key, op)
        select distinct 'postgres', kind, to_jsonb(n) ->> key_col, TG_OP
        from fusionsync_new_rows n
        where to_jsonb(n) ->> key_col is not null;
    elsif TG_OP = 'UPDATE' then
        insert into fusionsync.event (source, entity_kind, entity_key, op)
        select distinct 'postgres', kind, k, TG_OP
        from (
            select to_jsonb(n) ->> key_col as k from fusionsync_new_rows n
            union
            select to_jsonb(o) ->> key_col from fusionsync_old_rows o
        ) keys
        where k is not null;
    elsif TG_OP = 'DELETE' then
        insert into fusionsync.event (source, entity_kind, entity_key, op)
        select distinct 'postgres', kind, to_jsonb(o) ->> key_col, TG_OP
        from fusionsync_old_rows o
        where to_jsonb(o) ->> key_col is not null;
    end if;
    if found then
        perform pg_notify('fusionsync_events', '');
    end if;
    return null;
end;
$$;
