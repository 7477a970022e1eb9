package main

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/shardgate/shardgate/importer"
	pb "github.com/shardgate/shardgate/proto/shardgate/v1"
)

// exportRoundTrip imports n legacy accounts into one cluster, exports it
// (in two runs, the second continuing the first), loads the export into a
// second cluster and exports that: both exports must hold the same files.
func exportRoundTrip(t *testing.T, n int) (exportTook, loadTook time.Duration) {
	addrA, catA := startCluster(t)
	addrB, catB := startCluster(t)
	src, mapping := legacySource(t, n)
	g := globals{Addr: addrA}
	run(t, g, importStartCmd{Mapping: mapping, From: src, importTarget: importTarget{Catalog: catA, Name: "default"}, Parallel: 2, BatchRows: 5000, MaxJSONBytes: 65536})

	conn, err := grpc.NewClient(addrA, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx := context.Background()
	for _, k := range []string{"a", "b"} {
		if _, err := pb.NewDataServiceClient(conn).SetConfig(ctx, &pb.SetConfigRequest{Namespace: "app", Key: k, ValueJson: `{"on": true}`}); err != nil {
			t.Fatal(err)
		}
	}

	dirA, dirB := filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "b")
	start := time.Now()
	run(t, g, exportCmd{Out: dirA, Partitions: "0-1999", RangeSize: 512})
	out := run(t, g, exportCmd{Out: dirA, RangeSize: 512})
	exportTook = time.Since(start)
	if strings.Contains(out, "partitions 0-511") || !strings.Contains(out, "partitions 2000-2511") {
		t.Fatalf("the second export did not continue the first:\n%s", out)
	}
	start = time.Now()
	out = run(t, globals{Addr: addrB}, importStartCmd{FromNDJSON: dirA, importTarget: importTarget{Catalog: catB}, Parallel: 2, BatchRows: 5000})
	loadTook = time.Since(start)
	if !strings.Contains(out, "loaded "+itoa(n)+" users, "+itoa(n)+" items, 2 config values") {
		t.Fatalf("load:\n%s", out)
	}
	// Loading again writes nothing.
	if out := run(t, globals{Addr: addrB}, importStartCmd{FromNDJSON: dirA, importTarget: importTarget{Catalog: catB}, Parallel: 2, BatchRows: 5000}); !strings.Contains(out, "(0 written") {
		t.Fatalf("second load:\n%s", out)
	}
	run(t, globals{Addr: addrB}, exportCmd{Out: dirB, Partitions: "0-1999", RangeSize: 512})
	run(t, globals{Addr: addrB}, exportCmd{Out: dirB, RangeSize: 512})

	ma, err := importer.ReadManifest(dirA)
	if err != nil {
		t.Fatal(err)
	}
	mb, err := importer.ReadManifest(dirB)
	if err != nil {
		t.Fatal(err)
	}
	sums := func(m *importer.Manifest) map[string]string {
		out := map[string]string{m.Config.Name: m.Config.SHA256}
		for _, r := range m.Ranges {
			out[r.Users.Name], out[r.Items.Name] = r.Users.SHA256, r.Items.SHA256
		}
		return out
	}
	sa, sb := sums(ma), sums(mb)
	if len(sa) != 2*9+1 || len(sa) != len(sb) {
		t.Fatalf("files: %d and %d", len(sa), len(sb))
	}
	for name, sum := range sa {
		if sb[name] != sum {
			t.Errorf("%s differs after the round trip", name)
		}
	}
	var lines int64
	for _, r := range ma.Ranges {
		lines += r.Users.Lines + r.Items.Lines
	}
	if lines != int64(2*n) || !ma.Complete {
		t.Fatalf("manifest: %d lines, complete %v", lines, ma.Complete)
	}
	// A changed file is refused.
	f := filepath.Join(dirA, ma.Ranges[0].Users.Name)
	b, _ := os.ReadFile(f)
	os.WriteFile(f, append(b, '\n'), 0o600)
	err = importStartCmd{FromNDJSON: dirA, importTarget: importTarget{Catalog: catB}, Parallel: 2}.Run(&globals{out: os.Stderr})
	if err == nil || !strings.Contains(err.Error(), "the file changed since the export") {
		t.Fatalf("changed file: %v", err)
	}
	return exportTook, loadTook
}

func itoa(n int) string { return strconv.Itoa(n) }

func TestExportRoundTrip(t *testing.T) {
	exportRoundTrip(t, 500)
}

// TestExportRoundTripHeavy times the round trip of the 200k-row fixture
// (SHARDGATE_IMPORT_HEAVY=1).
func TestExportRoundTripHeavy(t *testing.T) {
	if os.Getenv("SHARDGATE_IMPORT_HEAVY") == "" {
		t.Skip("set SHARDGATE_IMPORT_HEAVY=1 for the 200k-row round trip")
	}
	exp, load := exportRoundTrip(t, 100_000)
	t.Logf("200k rows: export %s, load into a new cluster %s, round trip %s", exp.Round(time.Millisecond), load.Round(time.Millisecond), (exp + load).Round(time.Millisecond))
}
