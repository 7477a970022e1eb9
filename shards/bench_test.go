package shards

import (
	"fmt"
	"sync/atomic"
	"testing"
)

// The benchmarks run against the machine's Postgres over loopback; each
// operation is one round trip.

func BenchmarkGetUser(b *testing.B) {
	s := newShard(b, 1)
	ctx := testCtx(b)
	if _, err := s.PutUser(ctx, 1, "alice", []byte(`{"name":"Alice","plan":"pro","tags":["a","b"]}`), nil); err != nil {
		b.Fatal(err)
	}
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := s.GetUser(ctx, 1, "alice"); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := s.GetUser(ctx, 1, "alice"); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}

func BenchmarkPutUser(b *testing.B) {
	s := newShard(b, 1)
	ctx := testCtx(b)
	profile := []byte(`{"name":"Alice","plan":"pro","tags":["a","b"]}`)
	b.Run("unconditional", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := s.PutUser(ctx, 1, "alice", profile, nil); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("expected version", func(b *testing.B) {
		b.ReportAllocs()
		v, err := s.PutUser(ctx, 1, "bob", profile, nil)
		if err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			if v, err = s.PutUser(ctx, 1, "bob", profile, &v); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parallel distinct users", func(b *testing.B) {
		b.ReportAllocs()
		var n atomic.Int64
		b.RunParallel(func(pb *testing.PB) {
			id := fmt.Sprint("u-", n.Add(1)) // one user per goroutine: no row contention
			for pb.Next() {
				if _, err := s.PutUser(ctx, 1, id, profile, nil); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}
