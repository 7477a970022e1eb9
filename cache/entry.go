package cache

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"hash"
	"hash/maphash"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"
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

// Encoded form in Redis: a format byte, a kind byte, the time until which
// the entry may be served (Unix ms, a uvarint), then for a value the fields
// as varints and length-prefixed strings; last, a MAC (seal). A lease (a
// loader's claim on the key) starts with leaseByte instead, so a reader
// can never mistake one for the other.
const (
	formatByte = 2 // 1: before entries carried a MAC and a validity
	leaseByte  = 0

	kindValue    = 'V'
	kindNotFound = 'N'
	kindTooLarge = 'B'
)

// maxListMembers bounds the list a decoder accepts (the encoder never
// writes more than MaxListEntries).
const maxListMembers = 1 << 16

var (
	errCorrupt = errors.New("cache: corrupt entry")
	// errBadMAC: the entry was not written by a process holding the MAC
	// key, for this key (forged, copied from another key, or written by
	// an instance with another key or an older version).
	errBadMAC = errors.New("cache: entry fails its MAC")
	// errPastValidity: a genuine entry served past the TTL it was stored
	// with, which Redis should have expired (a replay, or clocks apart).
	errPastValidity = errors.New("cache: entry past its validity")
)

// MACKeySize is the least MAC key length accepted, in bytes.
const MACKeySize = 32

// macSize is the length of the HMAC-SHA256 tag at the end of an entry.
const macSize = sha256.Size

// macer computes entry MACs: HMAC-SHA256 under the shared key, over the
// Redis key (length-prefixed) and the encoded entry, so an entry is only
// good for the key it was written to.
type macer struct {
	pool sync.Pool
	seed maphash.Seed
	// small and large remember entries whose MAC passed, one per slot by
	// the key's hash (large: entries over largeEntry bytes, fewer slots so
	// they pin at most a few MB). rueidis hands a memory copy out as the
	// very string it read from Redis, into a buffer of its own that nothing
	// changes, so when the same string is handed out again its MAC need not
	// be computed again (what a namespace list of a megabyte costs). The
	// slot holds the string, so its memory cannot be reused for other bytes
	// while the pointer is compared against.
	small [smallSlots]atomic.Pointer[verified]
	large [largeSlots]atomic.Pointer[verified]
	// computed counts MAC computations (tests).
	computed atomic.Int64
}

// verified is an entry whose MAC passed, with its decoded form: the
// string cannot change, so neither can what it decodes to. Callers only
// read an Entry (its List included), so one decoded copy can be handed to
// all of them.
type verified struct {
	key, s     string
	e          Entry
	validUntil time.Time
}

const (
	smallSlots = 4096
	largeSlots = 16
	largeEntry = 64 << 10
)

type macState struct {
	h   hash.Hash
	sum []byte
	n   []byte // the key's length prefix
}

func newMACer(key []byte) *macer {
	k := append([]byte(nil), key...)
	m := &macer{seed: maphash.MakeSeed()}
	m.pool.New = func() any {
		return &macState{h: hmac.New(sha256.New, k), sum: make([]byte, 0, macSize), n: make([]byte, 0, binary.MaxVarintLen64)}
	}
	return m
}

// randomMACKey is the key of a cache given none: good for its own process
// only.
func randomMACKey() []byte {
	k := make([]byte, MACKeySize)
	rand.Read(k)
	return k
}

// tag appends the MAC of body stored under key to dst.
func (m *macer) tag(dst []byte, key, body string) []byte {
	m.computed.Add(1)
	st := m.pool.Get().(*macState)
	st.h.Reset()
	st.n = binary.AppendUvarint(st.n[:0], uint64(len(key)))
	st.h.Write(st.n)
	// Written in place, not copied: a hash never keeps or changes what
	// it is given, and a namespace list can be a megabyte.
	st.h.Write(unsafe.Slice(unsafe.StringData(key), len(key)))
	st.h.Write(unsafe.Slice(unsafe.StringData(body), len(body)))
	st.sum = st.h.Sum(st.sum[:0])
	dst = append(dst, st.sum...)
	m.pool.Put(st)
	return dst
}

// seal returns e's stored form under key, valid until validUntil.
func (m *macer) seal(key string, e Entry, validUntil time.Time) string {
	b := encode(e, validUntil)
	return string(m.tag(b, key, string(b)))
}

// open verifies and decodes an entry read from key. Strings in the result
// share s's memory. With remember, s is a string rueidis may hand out
// again from memory (DoCache): once its MAC passed, the same string is not
// checked again, only its validity.
func (m *macer) open(key, s string, now time.Time, remember bool) (Entry, error) {
	e, _, err := m.openUntil(key, s, now, remember)
	return e, err
}

// openUntil is open that also returns the time until which the entry may
// be served.
func (m *macer) openUntil(key, s string, now time.Time, remember bool) (Entry, time.Time, error) {
	if len(s) < macSize+2 || s[0] != formatByte {
		return Entry{}, time.Time{}, errBadMAC // not of this format: unsigned
	}
	body, mac := s[:len(s)-macSize], s[len(s)-macSize:]
	var slot *atomic.Pointer[verified]
	if remember {
		if len(s) > largeEntry {
			slot = &m.large[maphash.String(m.seed, key)%largeSlots]
		} else {
			slot = &m.small[maphash.String(m.seed, key)%smallSlots]
		}
		if v := slot.Load(); v != nil && unsafe.StringData(v.s) == unsafe.StringData(s) && len(v.s) == len(s) && v.key == key {
			// Checked and decoded before: only its validity may have
			// run out since.
			if now.After(v.validUntil) {
				return Entry{}, time.Time{}, errPastValidity
			}
			return v.e, v.validUntil, nil
		}
	}
	var want [macSize]byte
	if !hmac.Equal(m.tag(want[:0], key, body), []byte(mac)) {
		return Entry{}, time.Time{}, errBadMAC
	}
	e, validUntil, err := decode(body)
	if err != nil {
		return Entry{}, time.Time{}, err
	}
	if now.After(validUntil) {
		return Entry{}, time.Time{}, errPastValidity
	}
	if slot != nil {
		slot.Store(&verified{key: key, s: s, e: e, validUntil: validUntil})
	}
	return e, validUntil, nil
}

// encode returns e's stored form without its MAC, valid until validUntil
// (rounded down to the millisecond).
func encode(e Entry, validUntil time.Time) []byte {
	b := make([]byte, 0, 40+macSize+len(e.Owner)+len(e.Value)+listSize(e.List))
	b = append(b, formatByte)
	switch {
	case e.TooLarge:
		b = append(b, kindTooLarge)
	case !e.Found:
		b = append(b, kindNotFound)
	default:
		b = append(b, kindValue)
	}
	b = binary.AppendUvarint(b, uint64(max(0, validUntil.UnixMilli())))
	if e.TooLarge || !e.Found {
		return b
	}
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
	return b
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

// decode parses an entry without its MAC, and the time until which it is
// valid. Strings in the result share s's memory.
func decode(s string) (Entry, time.Time, error) {
	if len(s) < 2 || s[0] != formatByte {
		return Entry{}, time.Time{}, errCorrupt
	}
	kind := s[1]
	switch kind {
	case kindNotFound, kindTooLarge, kindValue:
	default:
		return Entry{}, time.Time{}, errCorrupt
	}
	d := decoder{s: s, i: 2}
	ms := d.uvarint()
	if ms > 1<<62 {
		d.bad = true
	}
	validUntil := time.UnixMilli(int64(ms))
	var e Entry
	switch kind {
	case kindNotFound:
	case kindTooLarge:
		e.TooLarge = true
	case kindValue:
		e = d.value(len(s))
	}
	if d.bad || d.i != len(s) {
		return Entry{}, time.Time{}, errCorrupt
	}
	return e, validUntil, nil
}

// value reads a value entry's fields.
func (d *decoder) value(size int) Entry {
	e := Entry{Found: true}
	e.Version = d.varint()
	e.UpdatedAt = d.time()
	e.ExpiresAt = d.time()
	e.Owner = d.string()
	e.Value = d.string()
	n := d.uvarint()
	if n > maxListMembers || n > uint64(size) {
		d.bad = true
		return Entry{}
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
	return e
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
