-- Relays are no longer woken by a NOTIFY at commit: PostgreSQL holds the
-- notify queue's lock from a notifying transaction's commit through its
-- WAL flush, so every notifying commit on the server waits for the one
-- before it and group commit is lost (measured: half the write throughput).
-- The instance that acknowledged a write wakes the relay instead (package
-- events, Waker), and relays poll as a safety net.

-- +goose Up
DROP TRIGGER outbox_notify ON outbox;
DROP FUNCTION outbox_notify();

-- +goose Down
-- +goose StatementBegin
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted) THEN
        PERFORM pg_notify('shardgate_outbox', '');
    END IF;
    RETURN NULL;
END
$$;
-- +goose StatementEnd
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
