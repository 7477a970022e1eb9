package auth

import (
	"context"
	"net"
	"testing"

	"google.golang.org/grpc/peer"
)

// The peer cache answers what PeerHost and anonymous would, one entry per
// IP (the port does not matter), and past maxPeers still answers right.
func TestPeerCache(t *testing.T) {
	from := func(addr net.Addr) context.Context {
		return peer.NewContext(context.Background(), &peer.Peer{Addr: addr})
	}
	var c peerCache
	check := func(ctx context.Context) *peerEntry {
		t.Helper()
		e := c.get(ctx)
		want := anonymous(ctx)
		if e.host != PeerHost(ctx) || *e.anon != *want {
			t.Fatalf("got host %q, principal %+v; want %q, %+v", e.host, *e.anon, PeerHost(ctx), *want)
		}
		return e
	}
	a := check(from(&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}))
	if b := check(from(&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 2})); b != a {
		t.Error("same IP, another port: not served from the cache")
	}
	if b := check(from(&net.TCPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 1})); b.anon.key != "anon:10.0.0.1" {
		t.Errorf("another IP: key %q", b.anon.key)
	}
	check(from(&net.TCPAddr{IP: net.ParseIP("::1"), Port: 1}))
	check(from(&net.TCPAddr{IP: net.ParseIP("fe80::1"), Port: 1, Zone: "eth0"}))
	check(from(&net.UnixAddr{Name: "/tmp/s", Net: "unix"}))
	check(context.Background())
	for i := range maxPeers + 10 {
		check(from(&net.TCPAddr{IP: net.IPv4(10, 1, byte(i>>8), byte(i)), Port: 1}))
	}
	if n := len(*c.m.Load()); n != maxPeers {
		t.Errorf("%d peers cached, want at most %d", n, maxPeers)
	}
}
