package importer

import (
	"fmt"
	"unicode"
	"unicode/utf8"
)

// The limits below are the API's (server/validate.go): a row the API would
// refuse is refused here too, so an imported row reads back through the API
// exactly as written.
const (
	maxUserID    = 128
	maxName      = 64  // collections and config namespaces
	maxKey       = 256 // item and config keys
	maxJSONDepth = 64
	// DefaultMaxJSONBytes is the server's default cap on a JSON field.
	DefaultMaxJSONBytes = 64 << 10
)

func isIDByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
		c == '.' || c == '_' || c == ':' || c == '@' || c == '-'
}

// ValidUserID checks a Shardgate user ID: 1-128 bytes of [A-Za-z0-9._:@-].
func ValidUserID(id string) error {
	if id == "" {
		return fmt.Errorf("empty")
	}
	if len(id) > maxUserID {
		return fmt.Errorf("%d bytes exceeds the limit of %d", len(id), maxUserID)
	}
	for i := 0; i < len(id); i++ {
		if !isIDByte(id[i]) {
			return fmt.Errorf("byte %d (%q) is not one of [A-Za-z0-9._:@-]", i, id[i])
		}
	}
	return nil
}

// validName checks a collection or namespace: 1-64 bytes of [A-Za-z0-9._-].
func validName(name string) error {
	if name == "" {
		return fmt.Errorf("empty")
	}
	if len(name) > maxName {
		return fmt.Errorf("%d bytes exceeds the limit of %d", len(name), maxName)
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; !(isIDByte(c) && c != ':' && c != '@') {
			return fmt.Errorf("byte %d (%q) is not one of [A-Za-z0-9._-]", i, c)
		}
	}
	return nil
}

// validKey checks an item or config key: 1-256 bytes of UTF-8 without
// control characters.
func validKey(key string) error {
	if key == "" {
		return fmt.Errorf("empty")
	}
	if len(key) > maxKey {
		return fmt.Errorf("%d bytes exceeds the limit of %d", len(key), maxKey)
	}
	if !utf8.ValidString(key) {
		return fmt.Errorf("not valid UTF-8")
	}
	for i, r := range key {
		if unicode.IsControl(r) {
			return fmt.Errorf("control character %U at byte %d", r, i)
		}
	}
	return nil
}

// validJSON checks JSON as PostgreSQL prints a jsonb (so it is valid and
// printed in its stored form): its size, depth and, with object, that it
// is an object.
func validJSON(s string, object bool, maxBytes int) error {
	if len(s) > maxBytes {
		return fmt.Errorf("%d bytes exceeds the limit of %d", len(s), maxBytes)
	}
	if object && (s == "" || s[0] != '{') {
		what := "not an object"
		if s != "" {
			switch s[0] {
			case '[':
				what = "an array, not an object"
			case '"':
				what = "a string, not an object"
			case 'n':
				what = "null, not an object"
			}
		}
		return fmt.Errorf("%s", what)
	}
	depth, level, inString := 0, 0, false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case inString && c == '\\':
			i++
		case c == '"':
			inString = !inString
		case inString:
		case c == '{' || c == '[':
			level++
			depth = max(depth, level)
		case c == '}' || c == ']':
			level--
		}
	}
	if depth > maxJSONDepth {
		return fmt.Errorf("nested %d levels deep; the limit is %d", depth, maxJSONDepth)
	}
	return nil
}
