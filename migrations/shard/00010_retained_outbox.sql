-- Postgres is the event log of record: the relay keeps delivered outbox
-- rows for a retention window (pruned by age, in seq order) instead of
-- deleting them once they are in Redis, so a stream Redis lost can be
-- published again and a Watch cursor older than the stream is served from
-- here. What the relay has delivered is one tick per partition: rows at or
-- below it are in the stream (or were, before Redis lost it). The marker
-- moves with its partition (shards.moveTables) and is written by the relay
-- only, never by writers, so it adds no lock to the write path.

-- +goose Up
CREATE TABLE outbox_delivered (
    partition integer PRIMARY KEY CHECK (partition >= 0),
    tick      bigint NOT NULL CHECK (tick >= 0)
);

-- Until now the relay deleted what it delivered, so every row still in the
-- outbox is undelivered. The lock waits for the writers in flight (their
-- ticks are taken but not committed) and holds off new ones until COMMIT.
LOCK TABLE outbox IN SHARE MODE;
INSERT INTO outbox_delivered (partition, tick)
SELECT c.partition, coalesce((SELECT min(o.tick) - 1 FROM outbox AS o WHERE o.partition = c.partition), c.tick)
FROM outbox_clock AS c;

-- +goose Down
DROP TABLE outbox_delivered;
