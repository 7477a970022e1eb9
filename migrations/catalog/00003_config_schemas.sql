-- Optional JSON Schema per config namespace. SetConfig and SetConfigSchema
-- serialize on a transaction-level advisory lock per namespace (shared for
-- SetConfig, exclusive for SetConfigSchema), so a value can never slip into
-- a namespace between the check of its existing values and the new schema.

-- +goose Up
CREATE TABLE config_schemas (
    namespace  text PRIMARY KEY,
    schema     text NOT NULL, -- as given: a schema's keyword order and text are kept
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- +goose Down
DROP TABLE config_schemas;
