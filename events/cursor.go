package events

import (
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
)

// ConfigStream stands for the config stream where a stream is named by its
// partition.
const ConfigStream int32 = -1

// Position is how far a reader has got in one stream: the tick of the last
// event it has seen there (0: none).
type Position struct {
	Stream int32 // a partition, or ConfigStream
	Tick   int64
}

// Cursor is where a watch stands in each stream it follows. Ticks have no
// gaps per stream, so a cursor says exactly which events come next.
type Cursor []Position

// MaxCursorBytes bounds an encoded cursor (4097 streams fit easily).
const MaxCursorBytes = 64 << 10

const cursorVersion = 1

// errCursor is the cause of every parse error.
var errCursor = errors.New("not a valid cursor")

// Tick returns the cursor's tick in stream and whether it has one.
func (c Cursor) Tick(stream int32) (int64, bool) {
	i, ok := slices.BinarySearchFunc(c, stream, func(p Position, s int32) int { return int(p.Stream) - int(s) })
	if !ok {
		return 0, false
	}
	return c[i].Tick, true
}

// String encodes the cursor: base64url (no padding) of a version byte, then
// per stream, in ascending order, the stream's distance from the previous
// one (the first from -2, so the config stream is 1) and its tick, both
// uvarints. The cursor must be sorted by stream without repeats.
func (c Cursor) String() string {
	b := make([]byte, 0, 1+len(c)*6)
	b = append(b, cursorVersion)
	prev := int64(-2)
	for _, p := range c {
		b = binary.AppendUvarint(b, uint64(int64(p.Stream)-prev))
		b = binary.AppendUvarint(b, uint64(p.Tick))
		prev = int64(p.Stream)
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

// ParseCursor decodes a cursor made by Cursor.String. It never panics; any
// other input is an error.
func ParseCursor(s string) (Cursor, error) {
	if len(s) > base64.RawURLEncoding.EncodedLen(MaxCursorBytes) {
		return nil, fmt.Errorf("%w: longer than %d bytes", errCursor, MaxCursorBytes)
	}
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("%w: bad encoding", errCursor)
	}
	if len(b) == 0 || b[0] != cursorVersion {
		return nil, fmt.Errorf("%w: unknown version", errCursor)
	}
	b = b[1:]
	var c Cursor
	prev := int64(-2)
	for len(b) > 0 {
		d, n := binary.Uvarint(b)
		if n <= 0 || d == 0 || d > 1<<32 {
			return nil, fmt.Errorf("%w: bad stream", errCursor)
		}
		b = b[n:]
		stream := prev + int64(d)
		if stream > 1<<31-1 {
			return nil, fmt.Errorf("%w: bad stream", errCursor)
		}
		tick, n := binary.Uvarint(b)
		if n <= 0 || tick > 1<<63-1 {
			return nil, fmt.Errorf("%w: bad tick", errCursor)
		}
		b = b[n:]
		c = append(c, Position{Stream: int32(stream), Tick: int64(tick)})
		prev = stream
	}
	return c, nil
}
