-- Every state change of an event is a non-HOT update that inserts into each index whose
-- predicate the new row matches. Keep that to the primary key plus one partial index per
-- state that is searched: trigger events (no dedup key) no longer enter the dedup index,
-- processing/done rows no longer enter the coalescing index, and done rows no index at all
-- (pruning scans them rarely and in batches).
drop index fusionsync.event_done_idx;
alter table fusionsync.event drop constraint event_dedup_key_key;
create unique index event_dedup_key_idx on fusionsync.event (dedup_key) where dedup_key is not null;
drop index fusionsync.event_entity_open_idx;
create index event_entity_pending_idx on fusionsync.event (entity_kind, entity_key) where state = 'pending';
