package server

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/shardgate/shardgate/shards"
)

// fieldError is bad input in one request field; it becomes InvalidArgument
// with a message that starts with the field's name.
type fieldError struct {
	field string
	msg   string
}

func (e *fieldError) Error() string { return e.field + ": " + e.msg }

func invalid(field, format string, args ...any) error {
	return &fieldError{field: field, msg: fmt.Sprintf(format, args...)}
}

// Limits on identifiers, from the API contract.
const (
	maxUserID     = 128
	maxName       = 64  // collections and config namespaces
	maxKey        = 256 // item and config keys
	maxTTLSeconds = 365 * 24 * 3600
	maxPageSize   = 1000
	defPageSize   = 100
	maxToken      = 128
)

func isIDByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
		c == '.' || c == '_' || c == ':' || c == '@' || c == '-'
}

// validateUserID checks 1-128 bytes of [A-Za-z0-9._:@-].
func validateUserID(field, id string) error {
	if id == "" {
		return invalid(field, "required")
	}
	if len(id) > maxUserID {
		return invalid(field, "%d bytes exceeds the limit of %d", len(id), maxUserID)
	}
	for i := 0; i < len(id); i++ {
		if !isIDByte(id[i]) {
			return invalid(field, "byte %d (%q) is not one of [A-Za-z0-9._:@-]", i, id[i])
		}
	}
	return nil
}

// validateName checks a collection or namespace: 1-64 bytes of [A-Za-z0-9._-].
func validateName(field, name string) error {
	if name == "" {
		return invalid(field, "required")
	}
	if len(name) > maxName {
		return invalid(field, "%d bytes exceeds the limit of %d", len(name), maxName)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(isIDByte(c) && c != ':' && c != '@') {
			return invalid(field, "byte %d (%q) is not one of [A-Za-z0-9._-]", i, c)
		}
	}
	return nil
}

// validateKey checks an item or config key: 1-256 bytes of UTF-8 without
// control characters (Postgres text cannot hold NUL; the rest would only
// make logs and terminals lie).
func validateKey(field, key string, allowEmpty bool) error {
	if key == "" {
		if allowEmpty {
			return nil
		}
		return invalid(field, "required")
	}
	if len(key) > maxKey {
		return invalid(field, "%d bytes exceeds the limit of %d", len(key), maxKey)
	}
	if !utf8.ValidString(key) {
		return invalid(field, "not valid UTF-8")
	}
	for i, r := range key {
		if unicode.IsControl(r) {
			return invalid(field, "control character %U at byte %d", r, i)
		}
	}
	return nil
}

// validateJSON checks a JSON field. object requires a JSON object, and
// then empty input reads as {} (see storedJSON). Values Postgres jsonb
// cannot store (a \u0000 escape) are refused here rather than by the shard.
func validateJSON(field, s string, object bool, maxBytes int) error {
	if s == "" {
		if object {
			return nil
		}
		return invalid(field, "required (any JSON value)")
	}
	if len(s) > maxBytes {
		return invalid(field, "%d bytes exceeds the limit of %d", len(s), maxBytes)
	}
	b := []byte(s)
	if !utf8.Valid(b) {
		return invalid(field, "not valid UTF-8")
	}
	if !json.Valid(b) {
		var v any
		// For the position of the error. A copy of its own: handing b
		// over would make b escape, a copy of s on every call.
		err := json.Unmarshal([]byte(s), &v)
		return invalid(field, "not valid JSON: %v", err)
	}
	if object && strings.TrimLeft(s, " \t\r\n")[0] != '{' {
		return invalid(field, "must be a JSON object")
	}
	if hasNULEscape(s) {
		return invalid(field, `contains \u0000, which cannot be stored`)
	}
	printed, depth, bad := jsonShape(b)
	switch {
	case bad != "":
		return invalid(field, "%s, which cannot be stored", bad)
	case depth > maxJSONDepth:
		return invalid(field, "nested %d levels deep; the limit is %d", depth, maxJSONDepth)
	case printed > maxBytes:
		return invalid(field, "%d bytes as stored and read back (numbers lose their exponent, separators gain a space); the limit is %d", printed, maxBytes)
	}
	return nil
}

// storedJSON is a JSON field validateJSON accepted, as the shards store
// it: an empty object field is {}.
func storedJSON(s string, object bool) []byte {
	if s == "" && object {
		return []byte("{}")
	}
	return []byte(s)
}

// maxJSONDepth bounds nesting: Postgres parses JSON recursively and fails
// (stack depth) somewhere past a few thousand levels.
const maxJSONDepth = 64

// Postgres numeric holds at most this many digits before and after the point.
const (
	maxNumericIntDigits  = 131072
	maxNumericFracDigits = 16383
)

// jsonShape scans valid JSON b once. It returns an upper bound on the length
// of b as Postgres prints it back from jsonb (a space after every ',' and
// ':', numbers without an exponent: "1e100000" comes back as a hundred
// thousand digits), the nesting depth, and, if b holds something jsonb
// refuses (an unpaired UTF-16 surrogate escape, a number beyond numeric's
// range), what it is.
func jsonShape(b []byte) (printed, depth int, bad string) {
	printed = len(b)
	level := 0
	for i := 0; i < len(b); i++ {
		switch c := b[i]; {
		case c == '"':
			end, ok := scanString(b, i+1)
			if !ok {
				return printed, depth, "an unpaired UTF-16 surrogate escape"
			}
			i = end
		case c == '[' || c == '{':
			level++
			depth = max(depth, level)
		case c == ']' || c == '}':
			level--
		case c == ',' || c == ':':
			printed++
		case c == '-' || c >= '0' && c <= '9':
			end, intDigits, fracDigits, exp := scanNumber(b, i)
			i = end - 1
			scale := max(0, fracDigits-exp)
			switch {
			case scale > maxNumericFracDigits:
				return printed, depth, "a number with more than 16383 digits after the point"
			case intDigits+exp > maxNumericIntDigits:
				return printed, depth, "a number with more than 131072 digits before the point"
			}
			if exp != 0 {
				printed += abs(exp) + 1 // zeros and a point the exponent turns into
			}
		}
	}
	return printed, depth, ""
}

// scanString returns the index of the closing quote of the string whose
// contents start at i, and false if it has a surrogate escape that is not
// a high one followed by a low one.
func scanString(b []byte, i int) (int, bool) {
	for ; b[i] != '"'; i++ {
		if b[i] != '\\' {
			continue
		}
		i++
		if b[i] != 'u' {
			continue
		}
		r := hex4(b[i+1 : i+5])
		i += 4
		switch {
		case r >= 0xDC00 && r <= 0xDFFF:
			return i, false
		case r >= 0xD800 && r <= 0xDBFF:
			if i+6 >= len(b) || b[i+1] != '\\' || b[i+2] != 'u' {
				return i, false
			}
			if lo := hex4(b[i+3 : i+7]); lo < 0xDC00 || lo > 0xDFFF {
				return i, false
			}
			i += 6
		}
	}
	return i, true
}

func hex4(h []byte) rune {
	var r rune
	for _, c := range h {
		r <<= 4
		switch {
		case c >= '0' && c <= '9':
			r |= rune(c - '0')
		case c >= 'a' && c <= 'f':
			r |= rune(c - 'a' + 10)
		default:
			r |= rune(c - 'A' + 10)
		}
	}
	return r
}

// scanNumber reads the valid JSON number at b[i:] and returns where it ends,
// its digits before and after the point, and its exponent (clamped to
// ±1e9, far past anything numeric holds).
func scanNumber(b []byte, i int) (end, intDigits, fracDigits, exp int) {
	if b[i] == '-' {
		i++
	}
	start := i
	for i < len(b) && b[i] >= '0' && b[i] <= '9' {
		i++
	}
	intDigits = i - start
	if i < len(b) && b[i] == '.' {
		i++
		start = i
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
		}
		fracDigits = i - start
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		neg := false
		if b[i] == '-' || b[i] == '+' {
			neg = b[i] == '-'
			i++
		}
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			if exp < 1e9 {
				exp = exp*10 + int(b[i]-'0')
			}
			i++
		}
		if neg {
			exp = -exp
		}
	}
	return i, intDigits, fracDigits, exp
}

func abs(n int) int {
	if n < 0 {
		return -n
	}
	return n
}

// hasNULEscape reports whether valid JSON s has a \u0000 escape (one that is
// not itself an escaped backslash followed by "u0000").
func hasNULEscape(s string) bool {
	for i := 0; ; {
		j := strings.Index(s[i:], `\u0000`)
		if j < 0 {
			return false
		}
		j += i
		n := 0
		for k := j - 1; k >= 0 && s[k] == '\\'; k-- {
			n++
		}
		if n%2 == 0 {
			return true
		}
		i = j + 1
	}
}

func validateTTL(field string, ttl int64) error {
	if ttl < 1 || ttl > maxTTLSeconds {
		return invalid(field, "%d is outside 1..%d seconds", ttl, maxTTLSeconds)
	}
	return nil
}

// validatePageSize checks a page size: 0 (the default) or 1-1000.
func validatePageSize(field string, n int32) error {
	if n < 0 || n > maxPageSize {
		return invalid(field, "%d is outside 1..%d", n, maxPageSize)
	}
	return nil
}

// pageSize is the rows a checked page size asks for.
func pageSize(n int32) int {
	if n == 0 {
		return defPageSize
	}
	return int(n)
}

// Page tokens carry the last key returned, base64url-encoded.
func encodePageToken(lastKey string) string {
	return base64.RawURLEncoding.EncodeToString([]byte(lastKey))
}

// decodePageToken checks a page token and returns the key it carries.
func decodePageToken(field, tok string) (string, error) {
	key, err := pageTokenKey(field, tok)
	if err != nil || key == "" {
		return key, err
	}
	if validateKey(field, key, false) != nil {
		return "", errNotPageToken(field)
	}
	return key, nil
}

// pageTokenKey decodes a page token that decodePageToken checked.
func pageTokenKey(field, tok string) (string, error) {
	if tok == "" {
		return "", nil
	}
	b, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil || len(b) == 0 {
		return "", errNotPageToken(field)
	}
	return string(b), nil
}

func errNotPageToken(field string) error {
	return invalid(field, "not a token from a previous ListItems response")
}

// Session page tokens carry the last session's creation time (µs, as
// Postgres keeps it) and token hash.
func encodeSessionPageToken(k shards.SessionKey) string {
	b := binary.BigEndian.AppendUint64(nil, uint64(k.CreatedAt.UnixMicro()))
	return base64.RawURLEncoding.EncodeToString(append(b, k.TokenHash...))
}

func decodeSessionPageToken(field, tok string) (shards.SessionKey, error) {
	if tok == "" {
		return shards.SessionKey{}, nil
	}
	b, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil || len(b) != 8+sha256.Size {
		return shards.SessionKey{}, invalid(field, "not a token from a previous ListSessions response")
	}
	return shards.SessionKey{
		CreatedAt: time.UnixMicro(int64(binary.BigEndian.Uint64(b))),
		TokenHash: b[8:],
	}, nil
}

// parseToken splits a session token "<partition>.<random>" and checks its
// shape. The random part is 32 base64url characters (192 bits).
func parseToken(field, tok string, partitions int) (int32, error) {
	if tok == "" {
		return 0, invalid(field, "required")
	}
	if len(tok) > maxToken {
		return 0, invalid(field, "%d bytes exceeds the limit of %d", len(tok), maxToken)
	}
	head, rest, ok := strings.Cut(tok, ".")
	if !ok || head == "" || len(head) > 7 || len(rest) != tokenRandomChars {
		return 0, invalid(field, "not a session token")
	}
	p, err := strconv.ParseUint(head, 10, 31)
	if err != nil || int(p) >= partitions || (len(head) > 1 && head[0] == '0') {
		return 0, invalid(field, "not a session token")
	}
	// Exactly the base64url alphabet: the decoder would skip CR and LF.
	for i := 0; i < len(rest); i++ {
		c := rest[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return 0, invalid(field, "not a session token")
		}
	}
	return int32(p), nil
}

// tokenPartition reads the partition of a session token parseToken
// checked. (Unchecked garbage yields a partition no shard owns, or one
// without the token's session: never a panic.)
func tokenPartition(tok string) int32 {
	var p int32
	for i := 0; i < len(tok) && tok[i] != '.'; i++ {
		p = p*10 + int32(tok[i]-'0')
	}
	return p
}
