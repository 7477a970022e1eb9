package shards

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/puddle/v2"

	"github.com/shardgate/shardgate/internal/versioning"
)

func TestOwnership(t *testing.T) {
	t.Parallel()
	s := newShard(t)
	ctx := testCtx(t)

	if got, err := s.Ownership(ctx); err != nil || len(got) != 0 {
		t.Fatalf("Ownership of a new shard = %v, %v", got, err)
	}
	steps := []struct {
		partitions []int32
		state      OwnershipState
	}{
		{[]int32{0, 1, 2, 3}, Owned},
		{[]int32{3, 3, 4}, Frozen}, // duplicates are fine
		{[]int32{1}, Moved},
		{nil, Owned}, // nothing to do
	}
	want := map[int32]OwnershipState{}
	for _, st := range steps {
		if err := s.SetOwnership(ctx, st.partitions, st.state); err != nil {
			t.Fatalf("SetOwnership(%v, %s): %v", st.partitions, st.state, err)
		}
		for _, p := range st.partitions {
			want[p] = st.state
		}
		got, err := s.Ownership(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !maps.Equal(got, want) {
			t.Fatalf("after SetOwnership(%v, %s): %v, want %v", st.partitions, st.state, got, want)
		}
	}

	for _, bad := range []struct {
		partitions []int32
		state      OwnershipState
	}{
		{[]int32{1}, "gone"},
		{[]int32{1}, ""},
		{[]int32{-1}, Owned},
	} {
		if err := s.SetOwnership(ctx, bad.partitions, bad.state); err == nil {
			t.Errorf("SetOwnership(%v, %q) succeeded", bad.partitions, bad.state)
		}
	}
	if got, _ := s.Ownership(ctx); !maps.Equal(got, want) {
		t.Fatalf("rejected calls changed ownership: %v", got)
	}
	if err := s.Ping(ctx); err != nil {
		t.Fatalf("Ping: %v", err)
	}
	if s.Name() != "test" {
		t.Fatalf("Name = %q", s.Name())
	}
}

func TestOpenBadDSN(t *testing.T) {
	t.Parallel()
	for _, dsn := range []string{
		"postgres://shard:hunter2@127.0.0.1:notaport/db",
		"postgres://shard:hunter2@[::1/db",
		"host=127.0.0.1 password=hunter2 port=x",
		"host=127.0.0.1 password='hunter2",
		"postgres://shard:hunter2@127.0.0.1/db?pool_max_conns=many",
	} {
		s, err := Open(context.Background(), "s7", dsn, PoolOptions{})
		if err == nil {
			s.Close()
			t.Errorf("Open(%q) succeeded", dsn)
			continue
		}
		if msg := err.Error(); strings.Contains(msg, "hunter2") || !strings.Contains(msg, "s7") || strings.Contains(msg, "127.0.0.1") {
			t.Errorf("Open(%q) error %q: must name the shard and not echo the DSN", dsn, msg)
		}
	}
}

// TestUnavailable opens a shard where nothing listens: Open succeeds, and
// every call fails with an error IsUnavailable recognizes.
func TestUnavailable(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := Open(ctx, "down", "postgres://postgres@127.0.0.1:1/x?sslmode=disable", PoolOptions{ConnectTimeout: time.Second})
	if err != nil {
		t.Fatalf("Open of a down shard failed: %v", err)
	}
	defer s.Close()

	calls := map[string]func() error{
		"GetUser": func() error { _, err := s.GetUser(ctx, 1, "a"); return err },
		"PutUser": func() error { _, err := s.PutUser(ctx, 1, "a", []byte(`{}`), nil); return err },
		"DeleteUser": func() error {
			_, err := s.DeleteUser(ctx, 1, "a", nil)
			return err
		},
		"ListItems": func() error { _, err := s.ListItems(ctx, 1, "a", "c", "", "", 1); return err },
		"Ping":      func() error { return s.Ping(ctx) },
		"Ownership": func() error { _, err := s.Ownership(ctx); return err },
	}
	for name, call := range calls {
		err := call()
		if !IsUnavailable(err) {
			t.Errorf("%s: IsUnavailable(%v) = false", name, err)
		}
		if errors.Is(err, versioning.ErrNotFound) || errors.Is(err, ErrWrongShard) {
			t.Errorf("%s: %v looks like an answer", name, err)
		}
	}

	// A server that accepts connections but never answers: the caller's
	// deadline, or the connect timeout, expires while connecting.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	mute := "postgres://postgres@" + ln.Addr().String() + "/x?sslmode=disable"
	for _, tc := range []struct {
		name     string
		ctxLimit time.Duration
		connect  time.Duration
	}{
		{"caller deadline", 100 * time.Millisecond, time.Minute},
		{"connect timeout", time.Minute, 100 * time.Millisecond},
	} {
		slow, err := Open(ctx, "mute", mute, PoolOptions{ConnectTimeout: tc.connect})
		if err != nil {
			t.Fatal(err)
		}
		cctx, cancel := context.WithTimeout(ctx, tc.ctxLimit)
		_, err = slow.GetUser(cctx, 1, "a")
		cancel()
		slow.Close()
		if !IsUnavailable(err) {
			t.Errorf("%s: IsUnavailable(%v) = false", tc.name, err)
		}
	}

	// Closed and zero shards.
	up := newShard(t, 1)
	up.Close()
	if _, err := up.GetUser(ctx, 1, "a"); !IsUnavailable(err) {
		t.Errorf("closed shard: IsUnavailable(%v) = false", err)
	}
	up.Close() // idempotent
	var zero Shard
	if _, err := zero.GetUser(ctx, 1, "a"); !IsUnavailable(err) {
		t.Errorf("zero shard: IsUnavailable(%v) = false", err)
	}
	zero.Close()
	if zero.Name() != "" || zero.Stat() != nil {
		t.Error("zero shard has a name or pool")
	}
}

func TestIsUnavailable(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{"nil", nil, false},
		{"not found", versioning.ErrNotFound, false},
		{"wrong shard", fmt.Errorf("get user: %w", ErrWrongShard), false},
		{"conflict", &versioning.ConflictError{Expected: 1, Current: 2}, false},
		{"unique violation", &pgconn.PgError{Code: "23505"}, false},
		{"query canceled", &pgconn.PgError{Code: "57014"}, false},
		{"connection failure", &pgconn.PgError{Code: "08006"}, true},
		{"connection does not exist", fmt.Errorf("x: %w", &pgconn.PgError{Code: "08003"}), true},
		{"admin shutdown", &pgconn.PgError{Code: "57P01"}, true},
		{"crash shutdown", &pgconn.PgError{Code: "57P02"}, true},
		{"cannot connect now", &pgconn.PgError{Code: "57P03"}, true},
		{"connect error", &pgconn.ConnectError{}, true},
		{"pool closed", fmt.Errorf("acquire: %w", puddle.ErrClosedPool), true},
		{"conn closed", pgconn.ErrConnClosed, true},
		{"refused", &net.OpError{Op: "dial", Err: syscall.ECONNREFUSED}, true},
		{"reset", fmt.Errorf("read: %w", syscall.ECONNRESET), true},
		{"unexpected EOF", fmt.Errorf("receive: %w", io.ErrUnexpectedEOF), true},
		{"caller canceled", context.Canceled, false},
		{"other", errors.New("boom"), false},
	}
	for _, tc := range tests {
		if got := IsUnavailable(tc.err); got != tc.want {
			t.Errorf("%s: IsUnavailable(%v) = %v, want %v", tc.name, tc.err, got, tc.want)
		}
	}
}

func TestConflictError(t *testing.T) {
	t.Parallel()
	tests := []struct {
		err  *versioning.ConflictError
		want string
	}{
		{&versioning.ConflictError{Expected: 3, Current: 5}, "version conflict: expected 3, current 5"},
		{&versioning.ConflictError{Expected: 3, Current: 0}, "version conflict: expected 3, current: does not exist"},
		{&versioning.ConflictError{Expected: 0, Current: 2}, "version conflict: expected 0, current 2"},
	}
	for _, tc := range tests {
		if got := tc.err.Error(); got != tc.want {
			t.Errorf("Error() = %q, want %q", got, tc.want)
		}
		wrapped := fmt.Errorf("put user: %w", tc.err)
		var ce *versioning.ConflictError
		if !errors.Is(wrapped, versioning.ErrConflict) || !errors.As(wrapped, &ce) || ce != tc.err {
			t.Errorf("%v: not matchable through wrapping", wrapped)
		}
		if errors.Is(wrapped, versioning.ErrNotFound) {
			t.Errorf("%v matches versioning.ErrNotFound", wrapped)
		}
	}
}
