package cache

import (
	"context"
	"encoding/hex"
)

// Key builders. Keys carry Prefix, then a kind, then the address; a
// session's address is the hex of its token's SHA-256, never the token.

// SessionKey is the key of the session whose token hashes to tokenHash.
func (c *Cache) SessionKey(tokenHash []byte) string {
	// Built on the stack (for prefixes up to 62 bytes): one allocation,
	// the string's.
	var buf [128]byte
	b := append(buf[:0], c.opts.Prefix...)
	b = append(b, "s:"...)
	b = hex.AppendEncode(b, tokenHash)
	return string(b)
}

// ConfigKey is the key of one config value. Namespaces never contain ':'
// (they are [A-Za-z0-9._-]), so the key cannot collide with another's.
func (c *Cache) ConfigKey(namespace, key string) string {
	return c.opts.Prefix + "c:" + namespace + ":" + key
}

// ConfigListKey is the key of a whole namespace, as ListConfig reads it.
// Every change in the namespace invalidates it (InvalidateConfig).
func (c *Cache) ConfigListKey(namespace string) string {
	return c.opts.Prefix + "l:" + namespace
}

// GetSession returns the session with this token hash from the cache, or
// loads it. An expired session is never returned: it reads as not found.
func (c *Cache) GetSession(ctx context.Context, tokenHash []byte, load Loader) (Entry, error) {
	return c.Get(ctx, c.SessionKey(tokenHash), c.opts.SessionTTL, load)
}

// GetConfig returns one config value from the cache, or loads it.
func (c *Cache) GetConfig(ctx context.Context, namespace, key string, load Loader) (Entry, error) {
	return c.Get(ctx, c.ConfigKey(namespace, key), c.opts.ConfigTTL, load)
}

// ListConfig returns a whole namespace (Entry.List in key order) from the
// cache, or loads it. A namespace with more than MaxListEntries values or
// MaxListBytes of them comes back TooLarge: the caller reads it from the
// database, page by page.
func (c *Cache) ListConfig(ctx context.Context, namespace string, load Loader) (Entry, error) {
	return c.Get(ctx, c.ConfigListKey(namespace), c.opts.ConfigTTL, func(ctx context.Context) (Entry, error) {
		e, err := load(ctx)
		if err != nil {
			return e, err
		}
		size := 0
		for _, m := range e.List {
			size += len(m.Key) + len(m.Value)
		}
		if len(e.List) > c.opts.MaxListEntries || size > c.opts.MaxListBytes {
			return Entry{TooLarge: true}, nil
		}
		e.Found = true
		return e, nil
	})
}

// MaxListEntries is the namespace size ListConfig caches; a loader should
// read one more to learn that a namespace is larger.
func (c *Cache) MaxListEntries() int { return c.opts.MaxListEntries }

// InvalidateSession invalidates the session whose token hashes to tokenHash.
func (c *Cache) InvalidateSession(ctx context.Context, tokenHash []byte) error {
	return c.Invalidate(ctx, c.SessionKey(tokenHash))
}

// InvalidateConfig invalidates one config value and its namespace's list.
func (c *Cache) InvalidateConfig(ctx context.Context, namespace, key string) error {
	return c.Invalidate(ctx, c.ConfigChangeKeys(namespace, key)...)
}

// ConfigChangeKeys are the keys a change of one config value invalidates:
// the value's and its namespace's list.
func (c *Cache) ConfigChangeKeys(namespace, key string) []string {
	return []string{c.ConfigKey(namespace, key), c.ConfigListKey(namespace)}
}
