-- As shard migration 00005: notify the config relay only for statements
-- that inserted config events, not for refused conditional writes.

-- +goose Up
DROP TRIGGER config_outbox_notify ON config_outbox;
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION config_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted) THEN
        PERFORM pg_notify('shardgate_config_outbox', '');
    END IF;
    RETURN NULL;
END
$$;
-- +goose StatementEnd
CREATE TRIGGER config_outbox_notify AFTER INSERT ON config_outbox
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION config_outbox_notify();

-- +goose Down
DROP TRIGGER config_outbox_notify ON config_outbox;
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION config_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('shardgate_config_outbox', '');
    RETURN NULL;
END
$$;
-- +goose StatementEnd
CREATE TRIGGER config_outbox_notify AFTER INSERT ON config_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION config_outbox_notify();
