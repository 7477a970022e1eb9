package events

import (
	"hash/fnv"
	"reflect"
	"testing"
)

// fuzzPartitionOf is a stand-in for the router's hash over 16 partitions.
func fuzzPartitionOf(user string) int32 {
	h := fnv.New32a()
	h.Write([]byte(user))
	return int32(h.Sum32() % 16)
}

// Whatever a stream entry holds, decoding and checking it never panics, and
// an entry a watch would deliver is an event of its stream that encodes
// back to the same entry.
func FuzzDecodeEntry(f *testing.F) {
	const uuid = "6b8f4a52-0cfa-4a0e-9a43-3d2b8d0f3c11"
	user := "alice"
	p := fuzzPartitionOf(user)
	f.Add(p, "7-0", uuid, user, "7", "user", user, "upsert", "3", "2026-12-03T10:00:00Z", `{"a":1}`, true, "")
	f.Add(p, "7-0", uuid, user, "7", "config", "auth/admins", "upsert", "99", "2026-12-03T10:00:00Z", `["alice"]`, true, "")
	f.Add(int32(-1), "2-0", uuid, "", "-1", "config", "ns/k", "delete", "2", "2026-12-03T10:00:00.5Z", "", false, "")
	f.Add(p, "1-1", "x", "", "", "", "", "", "garbage", "", "", false, "1")
	f.Add(p, "9-0", uuid, user, "7", "session", "ab", "upsert", "1", "2026-12-03T10:00:00Z", "", false, "")
	f.Add(p, "9-0", uuid, user, "7", "item", "c/k", "upsert", "1", "2026-12-03T10:00:00Z", `{`, true, "")
	f.Fuzz(func(t *testing.T, stream int32, id, eventID, userID, partition, entity, key, op, version, committedAt, payload string, hasPayload bool, omitted string) {
		fv := map[string]string{fieldID: eventID, fieldUser: userID, fieldPartition: partition, fieldEntity: entity,
			fieldKey: key, fieldOp: op, fieldVersion: version, fieldCommittedAt: committedAt}
		if hasPayload {
			fv[fieldPayload] = payload
		}
		if omitted != "" {
			fv[fieldOmitted] = omitted
		}
		e, err := decodeEntry(stream, id, fv)
		if err != nil {
			return
		}
		if err := checkEvent(&e, fv, fuzzPartitionOf); err != nil {
			return
		}
		if e.Partition != stream || entryID(e.Tick) != id {
			t.Fatalf("accepted %+v from stream %d, entry %s", e, stream, id)
		}
		if (e.Entity == EntityConfig) != (stream == ConfigStream) {
			t.Fatalf("accepted entity %s in stream %d", e.Entity, stream)
		}
		again := map[string]string{}
		f := e.fields()
		for i := 0; i < len(f); i += 2 {
			again[f[i]] = f[i+1]
		}
		back, err := decodeEntry(stream, entryID(e.Tick), again)
		if err != nil {
			t.Fatalf("re-encoded %+v does not decode: %v", e, err)
		}
		if err := checkEvent(&back, again, fuzzPartitionOf); err != nil {
			t.Fatalf("re-encoded %+v fails its check: %v", e, err)
		}
		if !back.CommittedAt.Equal(e.CommittedAt) {
			t.Fatalf("committed_at %v came back as %v", e.CommittedAt, back.CommittedAt)
		}
		back.CommittedAt = e.CommittedAt
		if !reflect.DeepEqual(back, e) {
			t.Fatalf("round trip:\n%+v\n%+v", e, back)
		}
	})
}
