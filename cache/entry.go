package cache

import (
	"encoding/binary"
	"errors"
	"time"
)

// Entry is what the cache holds for one key: a value (a session, a config
// value, or a whole config namespace in List), or the fact that there is
// none (Found false). Strings, not byte slices, so that a hit hands out the
// cached bytes without copying them.
type Entry struct {
	Found bool
	// TooLarge marks a list that is not cached because it is too big; the
	// caller reads it from the database instead.
	TooLarge  bool
	Key       string // a list member's config key
	Owner     string // a session's user ID
	Value     string // JSON as stored
	Version   int64
	UpdatedAt time.Time
	ExpiresAt time.Time // a session's expiry; zero for config
	List      []Entry   // a namespace's values, in key order
}

// Encoded form in Redis: a format byte, a kind byte, then for a value the
// fields as varints and length-prefixed strings. A lease (a loader's claim
// on the key) starts with leaseByte instead, so a reader can never mistake
// one for the other.
const (
	formatByte = 1
	leaseByte  = 0

	kindValue    = 'V'
	kindNotFound = 'N'
	kindTooLarge = 'B'
)

// maxListMembers bounds the list a decoder accepts (the encoder never
// writes more than MaxListEntries).
const maxListMembers = 1 << 16

var errCorrupt = errors.New("cache: corrupt entry")

// encode returns e's stored form.
func encode(e Entry) string {
	b := make([]byte, 0, 32+len(e.Owner)+len(e.Value)+listSize(e.List))
	b = append(b, formatByte)
	switch {
	case e.TooLarge:
		return string(append(b, kindTooLarge))
	case !e.Found:
		return string(append(b, kindNotFound))
	}
	b = append(b, kindValue)
	b = binary.AppendVarint(b, e.Version)
	b = appendTime(b, e.UpdatedAt)
	b = appendTime(b, e.ExpiresAt)
	b = appendString(b, e.Owner)
	b = appendString(b, e.Value)
	b = binary.AppendUvarint(b, uint64(len(e.List)))
	for _, m := range e.List {
		b = appendString(b, m.Key)
		b = appendString(b, m.Value)
		b = binary.AppendVarint(b, m.Version)
		b = appendTime(b, m.UpdatedAt)
	}
	return string(b)
}

func listSize(l []Entry) int {
	n := 0
	for _, m := range l {
		n += len(m.Key) + len(m.Value) + 24
	}
	return n
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// appendTime stores Unix nanoseconds; the zero time is 0.
func appendTime(b []byte, t time.Time) []byte {
	if t.IsZero() {
		return binary.AppendVarint(b, 0)
	}
	return binary.AppendVarint(b, t.UnixNano())
}

// decode parses a stored entry. Strings in the result share s's memory.
func decode(s string) (Entry, error) {
	if len(s) < 2 || s[0] != formatByte {
		return Entry{}, errCorrupt
	}
	switch s[1] {
	case kindNotFound:
		if len(s) != 2 {
			return Entry{}, errCorrupt
		}
		return Entry{}, nil
	case kindTooLarge:
		if len(s) != 2 {
			return Entry{}, errCorrupt
		}
		return Entry{TooLarge: true}, nil
	case kindValue:
	default:
		return Entry{}, errCorrupt
	}
	d := decoder{s: s, i: 2}
	e := Entry{Found: true}
	e.Version = d.varint()
	e.UpdatedAt = d.time()
	e.ExpiresAt = d.time()
	e.Owner = d.string()
	e.Value = d.string()
	n := d.uvarint()
	if n > maxListMembers || n > uint64(len(s)) {
		return Entry{}, errCorrupt
	}
	if n > 0 {
		e.List = make([]Entry, n)
		for i := range e.List {
			m := &e.List[i]
			m.Found = true
			m.Key = d.string()
			m.Value = d.string()
			m.Version = d.varint()
			m.UpdatedAt = d.time()
		}
	}
	if d.bad || d.i != len(s) {
		return Entry{}, errCorrupt
	}
	return e, nil
}

// decoder reads fields off s; after the first error every read returns
// zero and bad stays set.
type decoder struct {
	s   string
	i   int
	bad bool
}

func (d *decoder) uvarint() uint64 {
	var x uint64
	var shift uint
	for j := 0; j < binary.MaxVarintLen64; j++ {
		if d.bad || d.i >= len(d.s) {
			d.bad = true
			return 0
		}
		c := d.s[d.i]
		d.i++
		if c < 0x80 {
			if j == binary.MaxVarintLen64-1 && c > 1 {
				d.bad = true
				return 0
			}
			return x | uint64(c)<<shift
		}
		x |= uint64(c&0x7f) << shift
		shift += 7
	}
	d.bad = true
	return 0
}

func (d *decoder) varint() int64 {
	ux := d.uvarint()
	x := int64(ux >> 1)
	if ux&1 != 0 {
		x = ^x
	}
	return x
}

func (d *decoder) time() time.Time {
	n := d.varint()
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

func (d *decoder) string() string {
	n := d.uvarint()
	if d.bad || n > uint64(len(d.s)-d.i) {
		d.bad = true
		return ""
	}
	v := d.s[d.i : d.i+int(n)]
	d.i += int(n)
	return v
}
