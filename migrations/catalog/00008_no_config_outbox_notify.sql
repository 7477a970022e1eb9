-- As shard migration 00009: the config relay is woken by the writing
-- instance, not by a NOTIFY at commit, which serializes notifying commits.

-- +goose Up
DROP TRIGGER config_outbox_notify ON config_outbox;
DROP FUNCTION config_outbox_notify();

-- +goose Down
-- +goose StatementBegin
CREATE FUNCTION config_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
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
