package cache

import (
	"context"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shardgate/shardgate/internal/testenv"
)

// stallProxy forwards TCP to a target until stalled: then it stops
// forwarding without closing anything, as a network partition does. What
// was sent during the stall arrives when it ends, unless lose is set: then
// a connection that sends across the stall is reset and what it sent is
// lost (never half-delivered on a live connection, which TCP cannot do).
type stallProxy struct {
	lis     net.Listener
	target  string
	stalled atomic.Bool
	lose    atomic.Bool
	mu      sync.Mutex
	conns   []net.Conn
}

func newStallProxy(t *testing.T, target string) *stallProxy {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &stallProxy{lis: lis, target: target}
	t.Cleanup(func() {
		lis.Close()
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, c := range p.conns {
			c.Close()
		}
	})
	go func() {
		for {
			in, err := lis.Accept()
			if err != nil {
				return
			}
			out, err := net.Dial("tcp", target)
			if err != nil {
				in.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, in, out)
			p.mu.Unlock()
			go p.pipe(in, out)
			go p.pipe(out, in)
		}
	}()
	return p
}

func (p *stallProxy) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if p.stalled.Load() && p.lose.Load() {
			src.Close()
			dst.Close()
			return
		}
		for p.stalled.Load() && !p.lose.Load() {
			time.Sleep(5 * time.Millisecond)
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if err != io.EOF {
				dst.Close()
			}
			return
		}
	}
}

// TestPartitionedProcessStopsServingMemory: A reaches Redis through a link
// that goes silent (no reset). B's write cannot reach A's memory, but once
// rueidis finds A's connection dead (ConnTimeout) A drops its copy and reads
// the database. How long A served the old value is logged (-v).
func TestPartitionedProcessStopsServingMemory(t *testing.T) {
	t.Parallel()
	addr, prefix := testenv.Redis(t)
	proxy := newStallProxy(t, addr)
	a := newTestCache(t, proxy.lis.Addr().String(), prefix, Options{ConnTimeout: 500 * time.Millisecond})
	b := newTestCache(t, addr, prefix, Options{})
	s := newSource()
	k := a.ConfigKey("ns", "k")
	s.set(k, "1")
	readUntilLocalHit(t, a, k, s)
	proxy.stalled.Store(true)
	v := s.set(k, "2")
	if err := b.Invalidate(context.Background(), k); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	deadline := start.Add(30 * time.Second)
	stale := 0
	for {
		e := mustGet(t, a, k, s)
		if e.Version == v {
			break
		}
		stale++
		if time.Now().After(deadline) {
			t.Fatalf("A still serves version %d: %+v", e.Version, a.Stats())
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("partitioned process served the old value for %v (%d reads) with ConnTimeout 500ms; %+v",
		time.Since(start).Round(time.Millisecond), stale, a.Stats())
	proxy.stalled.Store(false)
}
