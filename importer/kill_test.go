package importer

import (
	"context"
	"os"
	"os/exec"
	"testing"
	"time"
)

// TestImportKilled kills (SIGKILL) a process running the bulk phase once a
// few checkpoints are in, starts the import again in this one, and checks
// that nothing is missing or doubled and that verification passes.
func TestImportKilled(t *testing.T) {
	if os.Getenv("SHARDGATE_IMPORT_CHILD_SRC") != "" {
		t.Skip("the child runs TestImportKilledChild")
	}
	const n = 5000
	src := legacy(t, n)
	cl, catalogDSN, dsns := newCluster(t)
	m := legacyMapping(t)

	cmd := exec.Command(os.Args[0], "-test.run=^TestImportKilledChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), "SHARDGATE_IMPORT_CHILD_SRC="+src, "SHARDGATE_IMPORT_CHILD_CATALOG="+catalogDSN)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	ctx := context.Background()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		_, tabs, err := cl.Catalog.GetImport(ctx, "default")
		if err == nil && tabs[0].RowsCopied >= 1000 {
			break
		}
		select {
		case err := <-exited:
			t.Fatalf("the child ended before it was killed: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			t.Fatal("no checkpoint from the child")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-exited
	_, tabs, err := cl.Catalog.GetImport(ctx, "default")
	if err != nil {
		t.Fatal(err)
	}
	if tabs[0].Done || tabs[1].Done {
		t.Fatalf("the child finished a table before it was killed: %+v", tabs)
	}

	if err := Start(ctx, cl, m, src, Options{BatchRows: 500}); err != nil {
		t.Fatal(err)
	}
	users, items, outbox, bumped := shardCounts(t, dsns)
	if users != n || items != n || outbox != 0 || bumped != 0 {
		t.Fatalf("users %d items %d outbox %d bumped %d, want %d %d 0 0", users, items, outbox, bumped, n, n)
	}
	rep, err := Verify(ctx, cl, m, src, VerifyOptions{})
	if err != nil || !rep.OK {
		t.Fatalf("verify: %+v %v", rep, err)
	}
}

// TestImportKilledChild is the process TestImportKilled kills.
func TestImportKilledChild(t *testing.T) {
	src, catalogDSN := os.Getenv("SHARDGATE_IMPORT_CHILD_SRC"), os.Getenv("SHARDGATE_IMPORT_CHILD_CATALOG")
	if src == "" {
		t.Skip("run by TestImportKilled")
	}
	cl, err := OpenCluster(context.Background(), catalogDSN, 4)
	if err != nil {
		t.Fatal(err)
	}
	// Small batches, one at a time: slow enough to be killed mid-way.
	err = Start(context.Background(), cl, legacyMapping(t), src, Options{BatchRows: 20, Parallel: 1})
	t.Fatalf("not killed: %v", err)
}
