-- Every write inserts one outbox row, so every outbox index and default is
-- paid on the write path. (partition, tick) is unique, moves with its
-- partition (it is the replica identity moves stream by) and is how every
-- reader finds rows, so it becomes the primary key and the (partition, seq)
-- key goes; seq stays, with its own index, for retention's scan in rough
-- commit order. xid has been unused since ticks order events (00002).

-- +goose Up
ALTER TABLE outbox DROP CONSTRAINT outbox_pkey;
-- Renames the index outbox_tick to outbox_pkey; it stays the replica identity.
ALTER TABLE outbox ADD CONSTRAINT outbox_pkey PRIMARY KEY USING INDEX outbox_tick;
ALTER TABLE outbox DROP COLUMN xid;

-- +goose Down
ALTER TABLE outbox ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE UNIQUE INDEX outbox_tick ON outbox (partition, tick);
ALTER TABLE outbox REPLICA IDENTITY USING INDEX outbox_tick;
ALTER TABLE outbox DROP CONSTRAINT outbox_pkey;
ALTER TABLE outbox ADD CONSTRAINT outbox_pkey PRIMARY KEY (partition, seq);
