-- As shard migration 00010: delivered config events stay in config_outbox
-- for the retention window, and the relay records the last tick it
-- delivered here instead of deleting rows. A table of its own, not a
-- column of config_outbox_clock: every config writer locks that row until
-- it commits.

-- +goose Up
CREATE TABLE config_outbox_delivered (
    id   boolean PRIMARY KEY DEFAULT true CHECK (id),
    tick bigint NOT NULL CHECK (tick >= 0)
);

-- Every row still in config_outbox is undelivered (see shard 00010).
LOCK TABLE config_outbox IN SHARE MODE;
INSERT INTO config_outbox_delivered (id, tick)
SELECT true, coalesce((SELECT min(tick) - 1 FROM config_outbox), (SELECT tick FROM config_outbox_clock), 0);

-- +goose Down
DROP TABLE config_outbox_delivered;
