-- Config change events: a commit clock for config_outbox, a wake-up
-- notification for the relay, and tombstones that keep versions rising
-- across delete and recreate. (Numbered 00002; 00003 belongs to another
-- change.)

-- +goose Up
-- One clock for all config: the config stream is global. The trigger holds
-- the row's lock until the writing transaction ends, so ticks are handed out
-- in commit order and, among committed rows, without gaps.
CREATE TABLE config_outbox_clock (
    id   boolean PRIMARY KEY DEFAULT true CHECK (id),
    tick bigint NOT NULL
);

ALTER TABLE config_outbox ADD COLUMN tick bigint;
UPDATE config_outbox AS o SET tick = n.tick
FROM (SELECT seq, row_number() OVER (ORDER BY xid, seq) AS tick FROM config_outbox) AS n
WHERE o.seq = n.seq;
INSERT INTO config_outbox_clock (id, tick) SELECT true, coalesce(max(tick), 0) FROM config_outbox;
ALTER TABLE config_outbox ALTER COLUMN tick SET NOT NULL;
CREATE UNIQUE INDEX config_outbox_tick ON config_outbox (tick);

-- +goose StatementBegin
CREATE FUNCTION config_outbox_tick() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE config_outbox_clock SET tick = tick + 1 RETURNING tick INTO NEW.tick;
    RETURN NEW;
END
$$;
-- +goose StatementEnd
CREATE TRIGGER config_outbox_tick BEFORE INSERT ON config_outbox
    FOR EACH ROW EXECUTE FUNCTION config_outbox_tick();

-- +goose StatementBegin
CREATE FUNCTION config_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('shardgate_config_outbox', '');
    RETURN NULL;
END
$$;
-- +goose StatementEnd
CREATE TRIGGER config_outbox_notify AFTER INSERT ON config_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION config_outbox_notify();

-- The version of the delete of a config key that has no live row.
CREATE TABLE config_tombstones (
    namespace  text NOT NULL,
    key        text COLLATE "C" NOT NULL,
    version    bigint NOT NULL CHECK (version > 0),
    deleted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, key)
);

-- +goose Down
DROP TABLE config_tombstones;
DROP TRIGGER config_outbox_notify ON config_outbox;
DROP FUNCTION config_outbox_notify();
DROP TRIGGER config_outbox_tick ON config_outbox;
DROP FUNCTION config_outbox_tick();
DROP INDEX config_outbox_tick;
ALTER TABLE config_outbox DROP COLUMN tick;
DROP TABLE config_outbox_clock;
