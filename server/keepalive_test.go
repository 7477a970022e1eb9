package server

import (
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// A client that pings more often than every 10 s is told to go away
// (ENHANCE_YOUR_CALM, "too_many_pings"): the keepalive enforcement policy.
func TestKeepaliveEnforcement(t *testing.T) {
	ts := newTestCluster(t, 1).start(t, false)
	conn, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := conn.Write([]byte(http2.ClientPreface)); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(conn, conn)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		if err := fr.WritePing(false, [8]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("no GOAWAY after 5 quick pings: %v", err)
		}
		if ga, ok := f.(*http2.GoAwayFrame); ok {
			if ga.ErrCode != http2.ErrCodeEnhanceYourCalm || string(ga.DebugData()) != "too_many_pings" {
				t.Fatalf("GOAWAY %v %q", ga.ErrCode, ga.DebugData())
			}
			return
		}
	}
}
